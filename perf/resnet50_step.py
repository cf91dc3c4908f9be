"""Time and peak memory of a ResNet-50 training step, eager and compiled.

    python perf/resnet50_step.py --out perf/results/<device>-<date>-resnet50-step.csv
    python perf/resnet50_step.py --providers bntriton_compile,torch_compile   # compiled only
    python perf/resnet50_step.py --device cpu --width 16 --batch 8 --size 64  # a small CNN on a CPU
    python perf/resnet50_step.py --device cpu --smoke        # tooling check only (CPU, native path)

Providers: ``fused`` (bntriton.convert_model(fuse=True)), ``bntriton`` (convert_model:
batch norms only), ``torch`` (eager, cuDNN), ``torch_compile`` (Inductor); the compiled
networks with bntriton's layers, ``bntriton_compile`` and ``fused_compile``
(convert_model, then torch.compile of the whole network).  A ``_graphs`` suffix on a
compiled provider compiles with ``mode="reduce-overhead"`` (CUDA graphs); a ``_graphed``
suffix on an eager one (``torch_graphed``, ``bntriton_graphed``, ``fused_graphed``)
captures the network's forward and backward with ``torch.cuda.make_graphed_callables`` and
replays them (CUDA only).  Passes:
``fwd_train_act`` (the training forward of the whole network) and ``bwd_train_act`` (its
backward).  Rows use the sweep's CSV columns (perf/schema.py) with ``bytes`` holding the
pass's peak memory (``torch.cuda.max_memory_allocated`` after a reset, minus what was
allocated before the pass) and ``gbps`` / ``pct_copy_bw`` left empty: a whole network is
not one memory-bound kernel.  ResNet-50 is written out here (torchvision's layout,
Bottleneck v1.5) so that the script needs nothing beyond torch.
"""
from __future__ import annotations

import argparse
import csv
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import bntriton  # noqa: E402
from schema import COLUMNS  # noqa: E402


class Bottleneck(nn.Module):
    def __init__(self, cin, mid, stride):
        super().__init__()
        cout = mid * 4
        self.conv1, self.bn1 = nn.Conv2d(cin, mid, 1, bias=False), nn.BatchNorm2d(mid)
        self.conv2, self.bn2 = nn.Conv2d(mid, mid, 3, stride, 1, bias=False), nn.BatchNorm2d(mid)
        self.conv3, self.bn3 = nn.Conv2d(mid, cout, 1, bias=False), nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        out += identity
        return self.relu(out)


class ResNet50(nn.Module):
    def __init__(self, width: int = 64, classes: int = 1000):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 7, 2, 3, bias=False)
        self.bn1, self.relu = nn.BatchNorm2d(width), nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        layers, cin = [], width
        for i, blocks in enumerate((3, 4, 6, 3)):
            mid = width * 2**i
            for j in range(blocks):
                layers.append(Bottleneck(cin, mid, 2 if j == 0 and i > 0 else 1))
                cin = mid * 4
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(cin, classes)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layers(x)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


PROVIDERS = ("fused", "bntriton", "torch", "torch_compile", "bntriton_compile", "fused_compile",
             "torch_compile_graphs", "bntriton_compile_graphs", "fused_compile_graphs",
             "torch_graphed", "bntriton_graphed", "fused_graphed")


def build(provider: str, width: int, device, dtype, channels_last: bool, backend: str = "inductor",
          sample: torch.Tensor | None = None) -> nn.Module:
    if provider not in PROVIDERS:
        raise ValueError(f"unknown provider {provider!r}; one of {', '.join(PROVIDERS)}")
    torch.manual_seed(0)
    model = ResNet50(width).to(device=device, dtype=dtype)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    layers = provider.split("_")[0]
    if layers == "fused":
        model = bntriton.convert_model(model, fuse=True)
    elif layers == "bntriton":
        model = bntriton.convert_model(model)
    if provider.endswith("_graphed"):
        # The whole forward and backward captured as CUDA graphs and replayed (running
        # statistics updated inside the graph: no host reads on the training path).
        return torch.cuda.make_graphed_callables(model, (sample,))
    if "_compile" not in provider:
        return model
    mode = "reduce-overhead" if provider.endswith("_graphs") else None
    return torch.compile(model, backend=backend, mode=mode)


def measure(model, x, reps: int, cuda: bool):
    """(fwd ms, bwd ms, fwd peak bytes, bwd peak bytes), medians over ``reps`` steps."""
    fwd_ms, bwd_ms, fwd_peak, bwd_peak = [], [], [], []
    for step in range(reps + 2):  # two warm-up steps (compilation, autotuning, caches)
        model.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        loss = model(x).float().square().mean()
        if cuda:
            torch.cuda.synchronize()
            fwd_peak.append(torch.cuda.max_memory_allocated() - base)
            base_b = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        t1 = time.perf_counter()
        loss.backward()
        if cuda:
            torch.cuda.synchronize()
            bwd_peak.append(torch.cuda.max_memory_allocated() - base_b)
        t2 = time.perf_counter()
        if step >= 2:
            fwd_ms.append((t1 - t0) * 1e3)
            bwd_ms.append((t2 - t1) * 1e3)
    peak = (statistics.median(fwd_peak[2:]), statistics.median(bwd_peak[2:])) if cuda else ("", "")
    return statistics.median(fwd_ms), statistics.median(bwd_ms), *peak


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--layout", default="channels_last", choices=["channels_last", "nchw"])
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--providers", default="fused,bntriton,torch,torch_compile",
                        help=f"comma-separated, of: {', '.join(PROVIDERS)}")
    parser.add_argument("--width", type=int, default=64, help="the stem's channels (64: ResNet-50 itself)")
    parser.add_argument("--compile-backend", default="inductor",
                        help="torch.compile's backend for the *_compile providers (aot_eager: tooling checks)")
    parser.add_argument("--smoke", action="store_true", help="tiny network and input: tooling check only")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    width, batch, size, reps = (4, 2, 32, 1) if args.smoke else (args.width, args.batch, args.size, args.reps)
    dtype = getattr(torch, args.dtype)
    channels_last = args.layout == "channels_last"
    x = torch.randn(batch, 3, size, size, device=device, dtype=dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    import triton

    name = torch.cuda.get_device_name(device) if cuda else "cpu"
    rows = []
    for provider in args.providers.split(","):
        try:
            fwd, bwd, fwd_peak, bwd_peak = measure(
                build(provider, width, device, dtype, channels_last, args.compile_backend, x), x, reps, cuda)
        except Exception as error:  # a provider that fails gets an error row, not a silent gap
            print(f"{provider}: {type(error).__name__}: {error}", file=sys.stderr)
            fwd = bwd = "error"
            fwd_peak = bwd_peak = ""
        for pass_, ms, peak in (("fwd_train_act", fwd, fwd_peak), ("bwd_train_act", bwd, bwd_peak)):
            rows.append(dict(zip(COLUMNS, (
                name, torch.__version__, triton.__version__, "resnet50_step",
                f"{batch}x3x{size}x{size}" + ("" if width == 64 else f"-width{width}"),
                args.layout, args.dtype, pass_, provider, ms if isinstance(ms, str) else f"{ms:.3f}",
                peak, "", ""))))
    writer = csv.DictWriter(sys.stdout, COLUMNS)
    writer.writeheader()
    writer.writerows(rows)
    if args.out:
        with open(args.out, "w", newline="") as f:
            w = csv.DictWriter(f, COLUMNS)
            w.writeheader()
            w.writerows(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
