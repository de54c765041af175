"""
The machine-speed probe's worker: times a fixed matmul workload on one device, in its own process.

Started once by `agent.probe.Probe` with the training run's environment (so CUDA_VISIBLE_DEVICES
and the thread count are the ones train.py gets), it answers each line on stdin with one JSON line:
the seconds of each repeat of the workload. It exits at end of input, so it ends with its caller.
It imports only torch, so it is a script, not a module of the agent package.

Usage: python agent/probe_worker.py cpu|cuda   (then write one line per probe)
"""

import json
import os
import sys
import time

import torch

# name: (matrix size, dtype, matmuls per repeat); fixed, so probe seconds compare across runs and resumes
WORKLOADS = {
    "cpu": (512, torch.float32, 32),  # about 50 ms a repeat on 2 idle cores, all of torch's threads
    "cuda": (4096, torch.float16, 200),  # about 40 ms a repeat on an H100-class GPU
}
REPEATS = 10  # timed repeats per probe; the caller takes the minimum, so a few hiccups do not count


def time_repeats(a: torch.Tensor, b: torch.Tensor, matmuls: int, synchronize) -> list[float]:
    a @ b  # untimed: wakes the threads (or the GPU's clocks) after the idle wait
    synchronize()
    seconds = []
    for _ in range(REPEATS):
        start = time.perf_counter()
        for _ in range(matmuls):
            a @ b
        synchronize()
        seconds.append(time.perf_counter() - start)
    return seconds


def main() -> None:
    device = sys.argv[1] if len(sys.argv) > 1 else "cpu"
    size, dtype, matmuls = WORKLOADS[device]
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(size, size, generator=generator).to(device=device, dtype=dtype)
    b = torch.randn(size, size, generator=generator).to(device=device, dtype=dtype)
    synchronize = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    uuid = str(torch.cuda.get_device_properties(0).uuid) if device == "cuda" else ""
    time_repeats(a, b, matmuls, synchronize)  # warms the allocator and the BLAS kernels once
    print(json.dumps({"pid": os.getpid(), "device": device, "gpu_uuid": uuid,
                      "threads": torch.get_num_threads()}), flush=True)
    for _ in sys.stdin:
        print(json.dumps({"repeats": time_repeats(a, b, matmuls, synchronize)}), flush=True)


if __name__ == "__main__":
    main()
