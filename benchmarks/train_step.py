"""Training throughput: the trainer's own step (`genret.training.train_step`) by batch size and optimizer.

The full-size Flickr8k run trained at about 20k tokens/s on an H200, where plain HF training of
the same LM shape ran at 93k. This times where the difference could be, on whatever device is
here, in a minute or two: a randomly initialised LM of SmolLM2-135M's shape with a vocabulary
the size of a pruned one plus 8,091 atomic ids, and batches shaped like the gpu-short run's
(a third memorize examples: 4 visual tokens, a 6-token prompt, a 2-token id; two thirds
retrieve examples: 4 query tokens, a 20-32-token prompt, a 2-token id).

    python benchmarks/train_step.py                                   # a GPU: 30 layers, batch 128-512
    python benchmarks/train_step.py --layers 2 --batches 16 32 --steps 3   # a CPU, minutes

Each variant: 3 warm-up steps, then --steps timed steps. Variants: batch size x optimizer (AdamW's
for-each implementation, which the trainer used before, or the fused one it now uses on CUDA) x
reading the loss back every step (what the trainer did) or every 20 (what it does now). Writes
<out>/results.json and <out>/results.md.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from scale import LM_SHAPE  # noqa: E402  (SmolLM2-135M's shape, the benchmark beside this file)


def make_batches(count: int, batch: int, vocab: int, images: int, seed: int = 0):
    from genret.model import Example

    rng = random.Random(seed)
    out = []
    for _ in range(count):
        rows = []
        for _ in range(batch):
            target = [rng.randrange(2, vocab), 0]
            if rng.random() < 1 / 3:
                rows.append(Example([rng.randrange(2, vocab) for _ in range(6)], target, image=rng.randrange(images)))
            else:
                prompt = [rng.randrange(2, vocab) for _ in range(rng.randint(20, 32))]
                rows.append(Example(prompt, target, query=rng.randrange(images)))
        out.append(rows)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--vocab", type=int, default=16_000, help="a pruned vocabulary plus the atomic ids")
    parser.add_argument("--batches", type=int, nargs="+", default=[128, 256, 512])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)

    from transformers import LlamaConfig, LlamaForCausalLM

    from genret.model import MultimodalLM, QueryPrefix, SoftPrefix
    from genret.training import LOSS_EVERY, train_step

    device = torch.device(args.device)
    torch.manual_seed(0)
    images = 8091
    lm = LlamaForCausalLM(LlamaConfig(vocab_size=args.vocab, num_hidden_layers=args.layers, **LM_SHAPE))
    model = MultimodalLM(lm, SoftPrefix(1280, LM_SHAPE["hidden_size"]), QueryPrefix(256, LM_SHAPE["hidden_size"]))
    model = model.to(device).train()
    features = torch.randn(images, 1280, device=device)
    queries = torch.nn.functional.normalize(torch.randn(images, 256, device=device), dim=-1)
    optimizers = ["foreach", "fused"] if device.type == "cuda" else ["foreach"]

    rows = []
    for batch in args.batches:
        batches = make_batches(args.steps + 3, batch, args.vocab, images)
        real = sum(model.length(ex) for b in batches[3:] for ex in b)
        padded = sum(len(b) * max(map(model.length, b)) for b in batches[3:])
        for name in optimizers:
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=name == "fused")
            for every in (1, LOSS_EVERY):
                losses = []
                for i, examples in enumerate(batches):
                    if i == 3:
                        if device.type == "cuda":
                            torch.cuda.synchronize()
                        started = time.perf_counter()
                    losses.append(train_step(model, optimizer, examples, 0, features, queries))
                    if (i + 1) % every == 0:
                        losses[-1].item()
                torch.stack(losses).mean().item()  # waits for the last step
                seconds = time.perf_counter() - started
                row = {"batch": batch, "optimizer": name, "loss read every": every,
                       "ms per step": 1000 * seconds / args.steps, "tokens/s": real / seconds,
                       "padded tokens/s": padded / seconds, "padding share": 1 - real / padded}
                print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}), flush=True)
                rows.append(row)
            del optimizer

    meta = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "CPU", "layers": args.layers,
            "vocab": args.vocab, "steps": args.steps, "torch": torch.__version__,
            "command": "python benchmarks/train_step.py " + " ".join(sys.argv[1:] if argv is None else argv)}
    out = args.out or REPO / "benchmarks" / "results" / f"train-step-{device.type}"
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    lines = [f"# Training step throughput ({meta['device']}, {args.layers} layers, vocabulary {args.vocab:,})", "",
             "| batch | optimizer | loss read every | ms/step | tokens/s | padded tokens/s | padding |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['batch']} | {r['optimizer']} | {r['loss read every']} | {r['ms per step']:.1f} | "
              f"{r['tokens/s']:,.0f} | {r['padded tokens/s']:,.0f} | {r['padding share']:.0%} |" for r in rows]
    lines += ["", f"Reproduce: `{meta['command']}`"]
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
