"""What a proposer's conversation costs: per-model prices, tokens as billed, and the tag's --max-cost budget.

The prices are data: agent/prices.json holds Anthropic's published rates in USD per million tokens
(cache_write defaults to 1.25 x input, the 5-minute write; cache_read to 0.1 x input), and a --prices
file in the same format is merged over it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from anthropic.types import Usage

from agent.stops import LoopStop, UserError

DEFAULT_PRICES = Path(__file__).with_name("prices.json")  # USD per million tokens, per model
_RATE_KEYS = ("input", "output", "cache_write", "cache_read")


class BudgetExhausted(LoopStop):
    """The tag's --max-cost is spent."""


class PriceFileError(UserError):
    """A price file that cannot be read as {"model": {"input": ..., "output": ...}}."""


class MissingPrice(UserError):
    """The model has no price, so its cost cannot be counted against --max-cost."""


@dataclass(frozen=True)
class Price:
    """USD per million tokens of one model."""

    input: float
    output: float
    cache_write: float
    cache_read: float

    @classmethod
    def of(
        cls, input: float, output: float, cache_write: float | None = None, cache_read: float | None = None
    ) -> Price:
        """A price whose cache rates default to 1.25x input (5-minute write) and 0.1x input (read)."""
        return cls(
            input=input,
            output=output,
            cache_write=input * 1.25 if cache_write is None else cache_write,
            cache_read=input * 0.1 if cache_read is None else cache_read,
        )


class PriceTable:
    """Per-model prices: agent/prices.json (Anthropic's published rates), with a user's price file merged over it."""

    def __init__(self, prices: Mapping[str, Price] | None = None):
        self.prices = {**_read_prices(DEFAULT_PRICES), **(prices or {})}

    @classmethod
    def load(cls, path: str | Path) -> PriceTable:
        """The defaults with a JSON file `{"model": {"input": 3.0, "output": 15.0}}` merged over them."""
        return cls(_read_prices(Path(path)))

    def price(self, model: str) -> Price:
        try:
            return self.prices[model]
        except KeyError:
            raise MissingPrice(
                f"there is no price for the model '{model}'; give a price file such as {_price_example(model)} "
                "(USD per million tokens) with --prices."
            ) from None


def _read_prices(path: Path) -> dict[str, Price]:
    """A price file's models and prices; cache rates are optional."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise PriceFileError(f"the price file {path} does not exist; check the path.") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise PriceFileError(f"the price file {path} is not readable JSON ({error}); fix it and run again.") from None
    if not isinstance(data, dict):
        raise PriceFileError(
            f"the price file {path} must map models to prices; write it like {_price_example('claude-x')}."
        )
    prices = {}
    for model, rates in data.items():
        if not (isinstance(rates, dict) and all(_is_number(rates.get(key)) for key in _RATE_KEYS[:2])
                and all(_is_number(rates[key]) for key in _RATE_KEYS[2:] if key in rates)):
            raise PriceFileError(
                f"the price file {path} gives '{model}' no numeric input and output prices; "
                f"write it like {_price_example(model)} (USD per million tokens)."
            )
        prices[model] = Price.of(**{key: float(rates[key]) for key in _RATE_KEYS if key in rates})
    return prices


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _price_example(model: str) -> str:
    return json.dumps({model: {"input": 3.0, "output": 15.0}})


@dataclass(frozen=True)
class TokenUsage:
    """Tokens summed over requests, split the way they are billed."""

    input: int = 0  # uncached input
    cache_write: int = 0
    cache_read: int = 0
    output: int = 0

    @classmethod
    def of(cls, usage: Usage) -> TokenUsage:
        return cls(
            input=usage.input_tokens,
            cache_write=usage.cache_creation_input_tokens or 0,
            cache_read=usage.cache_read_input_tokens or 0,
            output=usage.output_tokens,
        )

    def __add__(self, other: TokenUsage) -> TokenUsage:
        return TokenUsage(
            self.input + other.input,
            self.cache_write + other.cache_write,
            self.cache_read + other.cache_read,
            self.output + other.output,
        )

    def cost(self, price: Price) -> float:
        return (
            self.input * price.input
            + self.cache_write * price.cache_write
            + self.cache_read * price.cache_read
            + self.output * price.output
        ) / 1e6

    def ledger(self, price: Price) -> dict[str, float]:
        """The ledger's columns: input_tokens (cache writes included), cached_tokens, output_tokens, cost_usd."""
        return {
            "input_tokens": self.input + self.cache_write,
            "cached_tokens": self.cache_read,
            "output_tokens": self.output,
            "cost_usd": self.cost(price),
        }



@dataclass
class CostBudget:
    """--max-cost: USD the Claude proposer may spend on this tag, earlier invocations' spend included; None: no cap."""

    max_usd: float | None
    spent: float = 0.0  # the tag's spend so far: the ledger's cost_usd when the loop starts, then every request

    def charge(self, usd: float) -> None:
        self.spent += usd

    def check(self) -> None:
        """Raise BudgetExhausted once the spend reaches the cap."""
        if self.max_usd is not None and self.spent >= self.max_usd:
            raise BudgetExhausted(
                f"the --max-cost budget of ${self.max_usd:.2f} is spent (${self.spent:.2f}); "
                "raise it to continue, the same tag resumes."
            )
