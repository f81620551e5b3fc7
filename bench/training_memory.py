"""Peak memory of one training step at the study's sizes: does batch 32 fit a 24 GB machine?

Prints figures; it is not a test. Each measurement runs in a fresh child process that
builds the network and the SGD optimiser (momentum buffers included), then runs two
training steps (forward, loss, backward, step) on random input of the study's size, the
way ``gastrolens.training.trainer`` does (AMP on CUDA unless ``--no-amp``).

* CPU: peak resident set size of the child (``ru_maxrss``). Batch 32 at 512 px is slow
  on a small machine, so by default the CPU runs batches of 4 and 12 and extrapolates
  linearly to 32 (memory grows linearly with the batch: the saved activations); pass
  ``--batch-sizes 32`` to measure it outright.
* CUDA: ``torch.cuda.max_memory_allocated`` (plus what the caching allocator reserved).

Data loader workers add about two decoded batches each (32 x 3 x 512 x 512 float32 is
100 MB per batch), which is small beside the activations.

Examples::

    python bench/training_memory.py                      # CPU, batches 4 and 12, extrapolated to 32
    python bench/training_memory.py --device cuda --batch-sizes 32
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

TARGET_BATCH = 32
BUDGET_GIB = 24.0


def child(task: str, batch: int, device: str, amp: bool, output_stride: int) -> dict[str, float]:
    import resource

    import torch
    import torch.nn.functional as F

    from gastrolens.models.networks import build_classifier, build_segmenter
    from gastrolens.training.trainer import segmentation_loss

    size = 512 if task == "classifier" else 513
    model = build_classifier() if task == "classifier" else build_segmenter(output_stride)
    dev = torch.device(device)
    model.to(dev).train()
    optimiser = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9, weight_decay=1e-4)
    cuda = dev.type == "cuda"
    dtype = (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16) if cuda and amp else None
    x = torch.randn(batch, 3, size, size, device=dev)
    if cuda:
        x = x.contiguous(memory_format=torch.channels_last)
        model.to(memory_format=torch.channels_last)
    for _ in range(2):
        with torch.autocast("cuda", dtype=dtype) if dtype else torch.autocast("cpu", enabled=False):
            if task == "classifier":
                loss = F.cross_entropy(model(x).float(), torch.zeros(batch, dtype=torch.long, device=dev))
            else:
                target = torch.zeros(batch, 1, size, size, device=dev)
                loss = segmentation_loss(model(x)["out"].float(), target)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
    if cuda:
        torch.cuda.synchronize()
        return {
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
            "reserved_gib": torch.cuda.max_memory_reserved() / 2**30,
        }
    return {"peak_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def measure(task: str, batch: int, args: argparse.Namespace) -> dict[str, float]:
    command = [sys.executable, __file__, "--child", task, str(batch), "--device", args.device,
               "--output-stride", str(args.output_stride)] + (["--no-amp"] if args.no_amp else [])
    done = subprocess.run(command, check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-sizes", default=None, help="comma-separated (default: 4,12 on CPU, 32 on CUDA)")
    parser.add_argument("--tasks", default="classifier,segmenter")
    parser.add_argument("--output-stride", type=int, default=16)
    parser.add_argument("--no-amp", action="store_true")
    parser.add_argument("--child", nargs=2, metavar=("TASK", "BATCH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], int(args.child[1]), args.device, not args.no_amp, args.output_stride)))
        return
    batches = [int(b) for b in (args.batch_sizes or ("4,12" if args.device == "cpu" else "32")).split(",")]
    for task in args.tasks.split(","):
        label = task if task == "classifier" else f"segmenter-os{args.output_stride}"
        figures = {b: measure(task, b, args) for b in batches}
        for b, f in figures.items():
            extra = f", reserved {f['reserved_gib']:.2f} GiB" if "reserved_gib" in f else ""
            print(f"{label:16s} {args.device:5s} batch {b:3d}: peak {f['peak_gib']:.2f} GiB{extra}")
        if TARGET_BATCH not in figures and len(figures) >= 2:
            (b1, f1), (b2, f2) = sorted(figures.items())[:2]
            per_image = (f2["peak_gib"] - f1["peak_gib"]) / (b2 - b1)
            estimate = f1["peak_gib"] + per_image * (TARGET_BATCH - b1)
            verdict = "fits" if estimate < BUDGET_GIB else "does NOT fit"
            print(f"{label:16s} {args.device:5s} batch  32: about {estimate:.1f} GiB "
                  f"({per_image:.2f} GiB per image, extrapolated): {verdict} {BUDGET_GIB:.0f} GB")


if __name__ == "__main__":
    main()
