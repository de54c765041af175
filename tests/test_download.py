"""Downloads in prepare.py against a real HTTP server on 127.0.0.1: climbmix and tinystories from a
mirror (--base-url), resuming a cut-off transfer with a Range request, and the offline error."""

from __future__ import annotations

import hashlib
import io
import json
import os
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

import prepare


class Mirror:
    """Serves `files` (URL path -> bytes) over HTTP; paths in `cut` get their first answer cut in half."""

    def __init__(self, files: dict[str, bytes], cut: frozenset[str] = frozenset()):
        self.files, self.cut, self.requests = files, set(cut), []
        mirror = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                mirror.requests.append((self.path, self.headers.get("Range")))
                data = mirror.files.get(self.path)
                if data is None:
                    self.send_error(404)
                    return
                start = int(self.headers["Range"].removeprefix("bytes=").rstrip("-")) if self.headers["Range"] else 0
                self.send_response(206 if start else 200)
                if start:
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                self.send_header("Content-Length", str(len(data) - start))
                self.end_headers()
                if self.path in mirror.cut:
                    mirror.cut.discard(self.path)
                    self.wfile.write(data[:len(data) // 2])
                    self.close_connection = True
                    return
                self.wfile.write(data[start:])

            def log_message(self, format, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> Mirror:
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()


def parquet_bytes(texts: list[str]) -> bytes:
    sink = io.BytesIO()
    pq.write_table(pa.table({"text": texts}), sink)
    return sink.getvalue()


def shard(name: str, n: int = 300) -> bytes:
    """n short documents; enough text for the tokenizer to train on."""
    return parquet_bytes([f"{name} story {i}: a cat named Tom{i % 17} sat on mat {i * 3}. The end." for i in range(n)])


def test_climbmix_downloads_the_first_shard_and_the_pinned_val_and_test_shards(run_python, tmp_path):
    cache = tmp_path / "cache"
    files = {"/shard_00000.parquet": shard("train"), "/shard_06542.parquet": shard("val", 100),
             "/shard_06541.parquet": shard("test", 100), "/shard_00001.parquet": shard("unwanted")}
    with Mirror(files) as mirror:
        result = run_python("prepare.py", "--source", "climbmix", "--base-url", mirror.url, "--num-shards", "1",
                            env={"AUTORESEARCH_CACHE": str(cache)})
    assert result.returncode == 0, result.stderr
    assert sorted(path for path, _ in mirror.requests) == ["/shard_00000.parquet", "/shard_06541.parquet",
                                                           "/shard_06542.parquet"]
    folder = cache / "sources" / "climbmix"
    assert (folder / "shard_00000.parquet").read_bytes() == files["/shard_00000.parquet"]
    assert (folder / "shard_06542.parquet").read_bytes() == files["/shard_06542.parquet"]
    manifest = json.loads((cache / "prepared" / "cpu" / "prepared.json").read_text())
    assert manifest["fingerprint"].startswith("climbmix:")
    assert manifest["val"] == [str(folder / "shard_06542.parquet")]
    assert manifest["test"] == [str(folder / "shard_06541.parquet")]
    assert (cache / "prepared" / "cpu" / "tokenizer.pkl").exists()


def test_tinystories_downloads_from_its_train_and_validation_paths_and_halves_validation_into_val_and_test(
        run_python, tmp_path):
    cache = tmp_path / "cache"
    files = {"/train/0000.parquet": shard("train"), "/validation/0000.parquet": shard("val", 100)}
    with Mirror(files) as mirror:
        result = run_python("prepare.py", "--source", "tinystories", "--base-url", mirror.url, "--num-shards", "1",
                            env={"AUTORESEARCH_CACHE": str(cache)})
    assert result.returncode == 0, result.stderr
    assert sorted(path for path, _ in mirror.requests) == sorted(files)
    manifest = json.loads((cache / "prepared" / "cpu" / "prepared.json").read_text())
    assert manifest["fingerprint"].startswith("tinystories:")
    assert [Path(p).read_bytes() for p in manifest["train"]] == [files["/train/0000.parquet"]]
    stories = pq.read_table(io.BytesIO(files["/validation/0000.parquet"])).column("text").to_pylist()
    val, test = ([text for path in manifest[name] for text in pq.read_table(path).column("text").to_pylist()]
                 for name in ("val", "test"))
    in_test = [int(hashlib.sha256(s.encode()).hexdigest(), 16) % 2 == 1 for s in stories]
    assert val == [s for s, t in zip(stories, in_test) if not t] and test == [s for s, t in zip(stories, in_test) if t]
    assert 30 < len(test) < 70


def test_download_resumes_a_cut_transfer_with_a_range_request(tmp_path):
    data = os.urandom(3 << 20)  # several of download()'s 1 MiB chunks, so the cut leaves some on disk
    target = tmp_path / "shard.bin"
    with Mirror({"/shard.bin": data}, cut=frozenset({"/shard.bin"})) as mirror:
        prepare.download(f"{mirror.url}/shard.bin", str(target), attempts=3, backoff=0.01)
    assert target.read_bytes() == data
    ranges = [header for _, header in mirror.requests]
    assert ranges[0] is None
    assert len(ranges) == 2 and ranges[1].startswith("bytes=") and ranges[1] != "bytes=0-"
    assert not (tmp_path / "shard.bin.part").exists()


def test_unreachable_mirror_fails_with_one_sentence_about_the_network(run_python, assert_user_error, tmp_path):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    result = run_python("prepare.py", "--source", "climbmix", "--base-url", f"http://127.0.0.1:{closed_port}",
                        "--num-shards", "1", "--retries", "1", env={"AUTORESEARCH_CACHE": str(tmp_path)})
    assert_user_error(result, "network", "--source builtin")
