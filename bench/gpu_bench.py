"""LoRA training on one GPU, side by side in one run: HF PEFT, PEFT + Liger Kernel, and loraforge
(without layer checkpointing, with it, and with the layers' inputs offloaded to host memory), on
the same model, data shape and LoRA setup.

Usage (on the GPU machine, with the trainer built on the development machine):
  python3 bench/gpu_bench.py --trainer BIN --shape tinyllama|llama3-8b --seq N --batch N
                             [--steps 10] [--only peft,liger,loraforge,loraforge-layers,loraforge-offload,NAME-layers,...]
                             [--other-trainer NAME=BIN ...  (earlier builds, contenders NAME)]
                             [--profile  (loraforge contenders: the trainer's step profile)]
                             [--timeline (loraforge contenders: the trainer's step timeline)]
Prints one markdown table row per contender and one JSON line each (--json-out FILE too).

--profile sets LORAFORGE_PROFILE_STEPS to the warm-up count for the loraforge contenders: the
trainer times each phase of a step, synchronising the GPU between phases, and logs the mean per
phase over the timed steps; those `step profile:` lines are printed and kept in the JSON
(`profile`). Synchronising slows the run a little: take tokens/s from a run without it.
--timeline sets LORAFORGE_TIMELINE_STEPS likewise: CUDA events at each layer's and each phase's
end, nothing synchronised within a step; the `timeline:` lines (device and host time per
segment, and how much work the device had queued at each mark) are printed and kept (`timeline`).

Same for every contender: the model `peft_baseline.py --save-model` writes (random weights,
bf16), LoRA r=16 alpha=32 dropout 0 on all seven projections (fp32 factors), AdamW lr 1e-4,
every row a full `seq` tokens, 3 warm-up steps, then `--steps` timed. Peak memory is measured
the same way for all: NVML's device memory used, sampled every 5 ms from this process while the
contender runs, minus what was used before it started (so it counts the CUDA context and
everything the caching allocator holds). PEFT also prints torch's own peak
(`max_memory_allocated`), and loraforge its own NVML peak (`peak_gpu_memory_bytes`).
"""
import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pynvml

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from compare import steady_rate, write_job  # noqa: E402

GIB = 2**30


class Sampler:
    """The most device memory used while it runs, sampled on a thread."""

    def __init__(self, handle):
        self.handle, self.peak, self.stop = handle, 0, threading.Event()
        self.before = pynvml.nvmlDeviceGetMemoryInfo(handle).used
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self):
        while not self.stop.is_set():
            self.peak = max(self.peak, pynvml.nvmlDeviceGetMemoryInfo(self.handle).used)
            time.sleep(0.005)

    def finish(self) -> float:
        self.stop.set()
        self.thread.join()
        return (self.peak - self.before) / GIB


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--trainer", required=True)
    ap.add_argument("--other-trainer", action="append", default=[], metavar="NAME=PATH",
                    help="another build (say, loraforge-before), run as contender NAME (repeatable)")
    ap.add_argument("--shape", default="tinyllama")
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--layers", type=int, default=None,
                    help="fewer decoder layers than the shape has (peft_baseline.py's --layers)")
    ap.add_argument("--only", default="peft,liger,loraforge,loraforge-layers")
    ap.add_argument("--json-out", default=None)
    ap.add_argument("--work", default=None, help="folder for the model and data (default: a temporary one)")
    ap.add_argument("--profile", action="store_true",
                    help="the loraforge contenders log their step profile (LORAFORGE_PROFILE_STEPS)")
    ap.add_argument("--timeline", action="store_true",
                    help="the loraforge contenders log their step timeline (LORAFORGE_TIMELINE_STEPS)")
    args = ap.parse_args()
    warmup = 3
    pynvml.nvmlInit()
    handle = pynvml.nvmlDeviceGetHandleByIndex(0)
    card = pynvml.nvmlDeviceGetName(handle)
    card = card.decode() if isinstance(card, bytes) else card

    tmp = None if args.work else tempfile.TemporaryDirectory()
    work = Path(args.work or tmp.name)
    work.mkdir(parents=True, exist_ok=True)
    baseline = [sys.executable, str(HERE / "peft_baseline.py"), "--device", "cuda", "--shape", args.shape,
                "--seq", str(args.seq), "--batch", str(args.batch)]
    if args.layers:
        baseline += ["--layers", str(args.layers)]
    run([args.trainer, "fixture", "--out", str(work / "fixture")])
    config_path = work / "model/config.json"
    if not config_path.exists():
        run(baseline + ["--save-model", str(work / "model")])
    config = json.loads(config_path.read_text())
    if config["max_position_embeddings"] < args.seq:
        # A model saved for a shorter run: the same weights serve a longer one (RoPE without
        # scaling computes the same), and loraforge refuses a seq_len past this limit.
        config["max_position_embeddings"] = args.seq
        config_path.write_text(json.dumps(config, indent=1))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(work / "fixture/model" / name, work / "model" / name)
    job_path = write_job(work, args.seq, args.batch, warmup + args.steps)
    job = json.loads(job_path.read_text())

    others = dict(other.split("=", 1) for other in args.other_trainer)
    results = []
    for name in args.only.split(","):
        sampler = Sampler(handle)
        started = time.perf_counter()
        if name.startswith("peft") or name.startswith("liger"):
            flags = {"peft": [], "liger": ["--liger"], "peft-ckpt": ["--gradient-checkpointing"],
                     "liger-ckpt": ["--liger", "--gradient-checkpointing"]}[name]
            done = subprocess.run(baseline + ["--steps", str(args.steps)] + flags, capture_output=True, text=True)
            peak = sampler.finish()
            if done.returncode != 0:
                results.append({"name": name, "error": tail(done.stderr)})
                print(f"{name} failed:\n{tail(done.stderr)}", file=sys.stderr)
                continue
            report = json.loads(done.stdout.splitlines()[-1])
            results.append({"name": name, "tokens_per_s": report["tokens_per_s"], "nvml_peak_gib": round(peak, 2),
                            "torch_peak_gib": report.get("peak_mem_gib"), "wall_s": round(time.perf_counter() - started, 1)})
        else:
            # NAME, NAME-layers or NAME-offload: a build (loraforge, or an --other-trainer) and
            # the checkpointing it runs with (none unless the suffix names one).
            build, _, mode = name.rpartition("-")
            if mode not in ("layers", "offload") or not build:
                build, mode = name, "none"
            trainer = others.get(build, args.trainer if build == "loraforge" else None)
            if trainer is None:
                sys.exit(f"{name}: no build named {build} (the trainer, or an --other-trainer)")
            job["training"]["gradient_checkpointing"] = mode
            spec = work / f"job-{name}.json"
            spec.write_text(json.dumps(job))
            env = dict(os.environ, NO_COLOR="1", RUST_LOG="info")
            if args.profile:
                env["LORAFORGE_PROFILE_STEPS"] = str(warmup)
            if args.timeline:
                env["LORAFORGE_TIMELINE_STEPS"] = str(warmup)
            done = subprocess.run([trainer, "train", "--spec", str(spec), "--out", str(work / f"out-{name}"),
                                   "--device", "cuda"], env=env, capture_output=True, text=True)
            peak = sampler.finish()
            if done.returncode != 0:
                results.append({"name": name, "error": tail(done.stderr)})
                print(f"{name} failed:\n{tail(done.stderr)}", file=sys.stderr)
                continue
            summary = json.loads(done.stdout.splitlines()[-1])
            rate = steady_rate(done.stderr, summary, warmup, args.batch * args.seq)
            own = summary["metrics"].get("peak_gpu_memory_bytes")  # absent from older builds
            results.append({"name": name, "tokens_per_s": rate, "nvml_peak_gib": round(peak, 2),
                            "own_peak_gib": own and round(own / GIB, 2),
                            "final_loss": summary["metrics"]["final_loss"],
                            "wall_s": round(time.perf_counter() - started, 1)})
            if args.profile:
                profile = log_lines(done.stderr, "step profile:")
                results[-1].update(profiled=True, profile=profile)
                print(f"{name}:\n" + "\n".join(profile), file=sys.stderr)
            if args.timeline:
                timeline = log_lines(done.stderr, "timeline:")
                results[-1].update(timeline=timeline)
                print(f"{name}:\n" + "\n".join(timeline), file=sys.stderr)
        print(json.dumps(results[-1]), file=sys.stderr, flush=True)

    ref = {r["name"]: r for r in results if "error" not in r}
    peft, liger = ref.get("peft"), ref.get("liger")
    print(f"{time.strftime('%Y-%m-%d')}, {card}, {args.shape} shape, batch {args.batch} x seq {args.seq}, "
          f"{args.steps} timed steps after {warmup} warm-up")
    print("| trainer | tokens/s | x PEFT | x Liger | peak GiB (NVML) | x PEFT | x Liger | own peak GiB |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        if "error" in r:
            print(f"| {r['name']} | failed: {r['error'].splitlines()[-1][:120]} |||||||")
            continue
        ratio = lambda key, base: f"{r[key] / base[key]:.2f}" if base else "—"  # noqa: E731
        own = r.get("own_peak_gib") or r.get("torch_peak_gib")
        print(f"| {r['name']} | {r['tokens_per_s']:,.0f} | {ratio('tokens_per_s', peft)} | {ratio('tokens_per_s', liger)} "
              f"| {r['nvml_peak_gib']:.1f} | {ratio('nvml_peak_gib', peft)} | {ratio('nvml_peak_gib', liger)} | {own} |")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({"card": card, "shape": args.shape, "seq": args.seq,
                                                   "batch": args.batch, "results": results}, indent=1))


def log_lines(log: str, prefix: str) -> list:
    """The trainer's table whose lines start with `prefix`, without the log's own prefix."""
    log = re.sub(r"\x1b\[[0-9;]*m", "", log)
    return [line[line.index(prefix):] for line in log.splitlines() if prefix in line]


def tail(text: str, lines: int = 15) -> str:
    return "\n".join(re.sub(r"\x1b\[[0-9;]*m", "", text).splitlines()[-lines:])


def run(command: list) -> str:
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr}")
    return done.stdout


if __name__ == "__main__":
    main()
