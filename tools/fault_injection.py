"""Fault injection against a small `megads train` run: interrupts at every point of a step, kills,
preemption of multi-rank runs, damaged checkpoints and Hugging Face directories, non-finite
training, full and unwritable disks, config values people write. Prints a table of case -> result
and the counts (the README's reliability section quotes it).

    python tools/fault_injection.py                 # every case (a few minutes on 2 CPU cores)
    python tools/fault_injection.py --only kill     # the cases whose name contains "kill"
    python tools/fault_injection.py --no-torchrun   # skip the multi-rank cases

Every case runs the real command line in a fresh directory (through tools/harness/faults.py,
which arms a fault at a named point of a step) and checks what a user would: the exit status, a
one-line message on stderr and no traceback, what is on disk afterwards, and that resuming gives
exactly the records and weights of a run that was never interrupted.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from megads.config import Config, dump_config, load_config  # noqa: E402
from megads.shards import ShardedReader  # noqa: E402
from megads.train.checkpoint import list_checkpoints  # noqa: E402
from megads.train.metrics import MEASURED_FIELDS  # noqa: E402
from tools.harness.faults import POINTS  # noqa: E402

MODEL = ["model.vocab_size=512", "model.hidden_size=32", "model.num_hidden_layers=2", "model.first_k_dense_replace=1",
         "model.intermediate_size=64", "model.num_attention_heads=2", "model.q_lora_rank=16", "model.kv_lora_rank=16",
         "model.qk_nope_head_dim=8", "model.qk_rope_head_dim=8", "model.v_head_dim=8", "model.n_routed_experts=4",
         "model.num_experts_per_tok=2", "model.moe_intermediate_size=16", "model.n_group=2", "model.topk_group=1",
         "model.num_nextn_predict_layers=1", "model.max_position_embeddings=64"]
RUN = ["data.max_bytes=150000", "train.global_batch_size=4", "train.micro_batch_size=2", "train.seq_length=32",
       "train.warmup_steps=2", "train.lr=0.01", "train.min_lr=0.001", "train.log_every=1", "train.max_steps=5",
       "train.save_every=2", "train.keep_checkpoints=0", "train.eval_every=1", "train.eval_batches=1",
       "train.num_threads=1"]


@dataclass
class Outcome:
    ok: bool
    observed: str


class Lab:
    """Fresh directories, the command line with a fault, and the uninterrupted reference run."""

    def __init__(self, root: Path):
        self.root = root
        self.cache = root / "data-cache"
        self.count = 0
        self.reference: Optional[Path] = None

    def config(self, *extra: str) -> tuple[Path, Config]:
        self.count += 1
        out = self.root / f"run{self.count:03d}"
        cfg = load_config(None, [*MODEL, *RUN, f"data.cache_dir={self.cache}", f"train.output_dir={out}", *extra])
        path = self.root / f"run{self.count:03d}.yaml"
        path.write_text(dump_config(cfg))
        return path, cfg

    def megads(self, *args: str, fault: str = "", torchrun: int = 0, max_restarts: int = 0,
               env: Optional[dict] = None, preexec: Optional[Callable] = None, timeout: float = 300
               ) -> subprocess.CompletedProcess:
        environment = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "MEGADS_FAULT": fault,
                       **(env or {})}
        command = [sys.executable, str(REPO / "tools" / "harness" / "faults.py"), *args]
        if torchrun:
            command[1:2] = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={torchrun}",
                            f"--max-restarts={max_restarts}", "--monitor-interval=0.2",
                            str(REPO / "tools" / "harness" / "faults.py")]
        return subprocess.run(command, env=environment, cwd=REPO, capture_output=True, text=True, timeout=timeout,
                              preexec_fn=preexec)

    def uninterrupted(self) -> Path:
        if self.reference is None:
            path, cfg = self.config("train.save_every=0")
            done = self.megads("train", str(path))
            if done.returncode != 0:
                raise RuntimeError(f"the reference run failed:\n{done.stderr[-3000:]}")
            self.reference = Path(cfg.train.output_dir)
        return self.reference


# ----------------------------------------------------------------------------- checks


def records(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    return [{k: v for k, v in json.loads(line).items() if k not in MEASURED_FIELDS} for line in path.read_text().splitlines()]


def same_run(run_dir: Path, reference: Path) -> Optional[str]:
    """None if `run_dir` logged the same records and ended with the same weights as `reference`."""
    if records(run_dir) != records(reference):
        return "records differ from the uninterrupted run's"
    mine = ShardedReader(list_checkpoints(run_dir / "checkpoints")[-1] / "model")
    theirs = ShardedReader(list_checkpoints(reference / "checkpoints")[-1] / "model")
    if sorted(mine.keys()) != sorted(theirs.keys()):
        return "different tensors"
    for name in mine.keys():
        if not torch.equal(mine.get(name), theirs.get(name)):
            return f"weights differ ({name})"
    return None


def last_line(done: subprocess.CompletedProcess) -> str:
    lines = done.stderr.strip().splitlines()
    return lines[-1] if lines else ""


def one_sentence(done: subprocess.CompletedProcess, status: int, *words: str) -> Outcome:
    """The command exited with `status`, its last stderr line names `words`, no worker traceback."""
    line = last_line(done)
    traceback = "Traceback" in done.stderr
    ok = done.returncode == status and all(w in line for w in words) and not traceback
    return Outcome(ok, f"exit {done.returncode}: {line[:150]}" + (" [traceback]" if traceback else ""))


def steps_on_disk(run_dir: Path) -> str:
    names = [p.name for p in list_checkpoints(run_dir / "checkpoints")]
    return f"checkpoints {names or 'none'}, records {[r['step'] for r in records(run_dir)]}"


# ----------------------------------------------------------------------------- cases


def interrupt_case(action: str, point: str, step: int, status: int) -> Callable[[Lab], Outcome]:
    """`action` at `point` of step `step`: then the checkpoint and records on disk, and a resumed
    run equal to the uninterrupted one."""
    def run(lab: Lab) -> Outcome:
        reference = lab.uninterrupted()
        # A signal needs no scheduled save (except at the save point, reached only when one is due).
        save_every = {"kill": "train.save_every=2", "save": "train.save_every=3"}.get(
            action if action == "kill" else point, "train.save_every=0")
        path, cfg = lab.config(save_every)
        out = Path(cfg.train.output_dir)
        done = lab.megads("train", str(path), fault=f"{action}@{point}:{step}")
        seen = steps_on_disk(out)
        expected_last = step if action != "kill" else 2
        stopped_right = done.returncode == status and list_checkpoints(out / "checkpoints")[-1].name == f"step_{expected_last}"
        if action != "kill":
            stopped_right &= [r["step"] for r in records(out)] == list(range(1, step + 1))
        resumed = lab.megads("train", str(path))
        difference = same_run(out, reference) if resumed.returncode == 0 else f"resume exit {resumed.returncode}"
        return Outcome(stopped_right and difference is None,
                       f"exit {done.returncode}; {seen}; resumed: {difference or 'identical'}")
    return run


def torchrun_restart(lab: Lab) -> Outcome:
    path, cfg = lab.config()
    done = lab.megads("train", str(path), fault="kill@optimizer:4:1", torchrun=2, max_restarts=1)
    out = Path(cfg.train.output_dir)
    resumed = "resumed from" in done.stdout
    ok = done.returncode == 0 and resumed and [r["step"] for r in records(out)] == [1, 2, 3, 4, 5]
    return Outcome(ok, f"exit {done.returncode}, {'resumed' if resumed else 'not resumed'}; {steps_on_disk(out)}")


def torchrun_sigterm(lab: Lab) -> Outcome:
    path, cfg = lab.config("train.save_every=0")
    done = lab.megads("train", str(path), fault="term_launcher@backward:3:0", torchrun=2)
    out = Path(cfg.train.output_dir)
    worker_traceback = "[rank0]: Traceback" in done.stderr or "[rank1]: Traceback" in done.stderr
    ok = ("stopped by SIGTERM after step 3" in done.stderr and not worker_traceback
          and [p.name for p in list_checkpoints(out / "checkpoints")] == ["step_3"])
    return Outcome(ok, f"torchrun exit {done.returncode}; {steps_on_disk(out)}")


def stuck_rank(action: str) -> Callable[[Lab], Outcome]:
    """Two plain processes (no launcher to notice): rank 1 killed or stopped mid-step."""
    def run(lab: Lab) -> Outcome:
        path, _ = lab.config("parallel.collective_timeout_s=8")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        procs, started = [], time.monotonic()
        for rank in (0, 1):
            env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "MEGADS_FAULT": f"{action}@backward:2:1",
                   "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
                   "MASTER_PORT": str(port)}
            procs.append(subprocess.Popen([sys.executable, str(REPO / "tools" / "harness" / "faults.py"), "train",
                                           str(path)], env=env, cwd=REPO, stdout=subprocess.PIPE,
                                          stderr=subprocess.PIPE, text=True))
        try:
            _, err = procs[0].communicate(timeout=180)
        finally:
            procs[1].kill()
            procs[1].communicate()
        done = subprocess.CompletedProcess([], procs[0].returncode, "", err)
        outcome = one_sentence(done, 1, "another rank stopped")
        outcome.observed = f"rank 0 after {time.monotonic() - started:.0f} s, " + outcome.observed
        return outcome
    return run


def damaged_checkpoint(victim: str) -> Callable[[Lab], Outcome]:
    def run(lab: Lab) -> Outcome:
        path, cfg = lab.config("train.max_steps=4")
        lab.megads("train", str(path))
        out = Path(cfg.train.output_dir)
        target = out / "checkpoints" / "step_4" / victim
        with open(target, "r+b") as f:
            f.seek(target.stat().st_size // 2)
            f.write(os.urandom(32))
        path.write_text(path.read_text().replace("max_steps: 4", "max_steps: 6"))
        done = lab.megads("train", str(path))
        outcome = one_sentence(done, 1, victim, "step_2")
        intact = [p.name for p in list_checkpoints(out / "checkpoints")] == ["step_2", "step_4"]
        return Outcome(outcome.ok and intact, outcome.observed + ("" if intact else " [checkpoints changed]"))
    return run


def damaged_manifest(content: bytes) -> Callable[[Lab], Outcome]:
    def run(lab: Lab) -> Outcome:
        path, cfg = lab.config("train.max_steps=2")
        lab.megads("train", str(path))
        (Path(cfg.train.output_dir) / "checkpoints" / "step_2" / "COMPLETE").write_bytes(content)
        path.write_text(path.read_text().replace("max_steps: 2", "max_steps: 4"))
        return one_sentence(lab.megads("train", str(path)), 1, "COMPLETE")
    return run


def hf_directory(damage: str) -> Callable[[Lab], Outcome]:
    """export-hf a checkpoint, damage the export, import-hf it back."""
    def run(lab: Lab) -> Outcome:
        path, cfg = lab.config("train.max_steps=1")
        lab.megads("train", str(path))
        hf = lab.root / f"hf{lab.count:03d}"
        lab.megads("export-hf", str(cfg.train.output_dir), str(hf))
        if damage == "config":
            (hf / "config.json").write_bytes(os.urandom(200))
            words = ("config.json",)
        else:
            shard = next(hf.glob("model-*.safetensors"))
            header = 8 + int.from_bytes(shard.read_bytes()[:8], "little")
            with open(shard, "r+b") as f:
                f.seek(header)
                f.write(b"\xff" * 4096)  # NaN in FP32 and BF16
            words = ("non-finite", shard.name)
        target = lab.root / f"imported{lab.count:03d}"
        outcome = one_sentence(lab.megads("import-hf", str(hf), str(target)), 1, *words)
        return Outcome(outcome.ok and not target.exists(), outcome.observed)
    return run


def huge_lr(lab: Lab) -> Outcome:
    path, cfg = lab.config("train.lr=1e38", "train.min_lr=0", "train.max_skipped_steps=3", "train.max_steps=20",
                           "train.save_every=0")
    done = lab.megads("train", str(path))
    outcome = one_sentence(done, 1, "max_skipped_steps")
    out = Path(cfg.train.output_dir)
    untouched = list_checkpoints(out / "checkpoints") == []
    return Outcome(outcome.ok and untouched, outcome.observed)


def config_value(override: str, status: int, *words: str) -> Callable[[Lab], Outcome]:
    def run(lab: Lab) -> Outcome:
        path, _ = lab.config("train.max_steps=1")
        text = path.read_text()
        section, assignment = override.split(".", 1)
        key, value = assignment.split("=", 1)
        lines = text.splitlines()
        start = lines.index(f"{section}:")
        for i in range(start + 1, len(lines)):
            if lines[i].startswith(f"  {key}:"):
                lines[i] = f"  {key}: {value}"
        path.write_text("\n".join(lines) + "\n")
        return one_sentence(lab.megads("train", str(path)), status, *words)
    return run


def garbage_config(lab: Lab) -> Outcome:
    path = lab.root / "garbage.yaml"
    path.write_bytes(os.urandom(300))
    return one_sentence(lab.megads("train", str(path)), 2, "garbage.yaml")


def full_disk(lab: Lab) -> Outcome:
    """A file-size limit stands in for a full disk: writes fail with the same errno path."""
    path, cfg = lab.config("train.max_steps=2")
    lab.megads("train", str(path))
    path.write_text(path.read_text().replace("max_steps: 2", "max_steps: 4"))

    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))

    outcome = one_sentence(lab.megads("train", str(path), preexec=limit), 1, "Could not save checkpoint step_4",
                           "step_2")
    out = Path(cfg.train.output_dir)
    intact = [p.name for p in list_checkpoints(out / "checkpoints")] == ["step_2"]
    return Outcome(outcome.ok and intact, outcome.observed)


def unwritable_output(lab: Lab) -> Outcome:
    path, cfg = lab.config()
    out = Path(cfg.train.output_dir)
    out.mkdir(parents=True)
    if os.geteuid() == 0:  # root writes through permissions
        (out / "checkpoints").write_text("a file where the checkpoints directory should be")
    else:
        out.chmod(0o500)
    outcome = one_sentence(lab.megads("train", str(path)), 1, "not writable", "nothing was trained")
    return Outcome(outcome.ok and not (out / "metrics.jsonl").exists(), outcome.observed)


CASES: list[tuple[str, str, str, Callable[[Lab], Outcome]]] = [
    *[("1 interrupt", f"SIGTERM at {p}", "exit 143, step_3 saved, exact resume", interrupt_case("sigterm", p, 3, 143))
      for p in POINTS],
    ("1 interrupt", "Ctrl-C at optimizer", "exit 130, step_3 saved, exact resume", interrupt_case("sigint", "optimizer", 3, 130)),
    *[("1 interrupt", f"kill -9 at {p}", "step_2 kept, exact resume",
       interrupt_case("kill", p, 4 if p == "save" else 3, -9)) for p in POINTS],
    ("2 multi-rank", "torchrun, rank 1 killed, --max-restarts 1", "restarts and finishes", torchrun_restart),
    ("2 multi-rank", "SIGTERM to torchrun", "one checkpoint (step_3), no worker traceback", torchrun_sigterm),
    ("2 multi-rank", "rank 1 killed, no launcher", "rank 0: exit 1, one line", stuck_rank("kill")),
    ("2 multi-rank", "rank 1 stuck (SIGSTOP), no launcher", "rank 0: exit 1 after the timeout", stuck_rank("hang")),
    *[("3 corruption", f"random bytes in {v}", "exit 1 naming it and step_2, nothing deleted", damaged_checkpoint(v))
      for v in ("model/model-00001-of-00001.safetensors", "optimizer/exp_avg-00001-of-00001.safetensors", "trainer_state.pt", "config.yaml")],
    ("3 corruption", "HF shard data overwritten (import-hf)", "exit 1 naming tensor and shard", hf_directory("shard")),
    ("4 non-finite", "train.lr: 1e38 (every update overflows)", "exit 1 after max_skipped_steps", huge_lr),
    ("4 non-finite", "train.lr: .inf", "exit 2 naming train.lr", config_value("train.lr=.inf", 2, "train.lr")),
    ("5 sentences", "manifest not UTF-8", "exit 1 naming COMPLETE", damaged_manifest(b"\x80\x81\x82")),
    ("5 sentences", "manifest a JSON list", "exit 1 naming COMPLETE", damaged_manifest(b"[1, 2]")),
    ("5 sentences", "random bytes as config file", "exit 2 naming it", garbage_config),
    ("5 sentences", "random bytes as HF config.json", "exit 1 naming it", hf_directory("config")),
    ("5 sentences", "full disk during a save", "exit 1, step_2 kept", full_disk),
    ("5 sentences", "unwritable output directory", "exit 1 before training", unwritable_output),
    ("6 values", "train.lr: 1e-3 (YAML 1.1 string)", "accepted", config_value("train.lr=1e-3", 0, )),
    ("6 values", "train.seq_length above max_position_embeddings", "exit 2 naming both",
     config_value("train.seq_length=128", 2, "train.seq_length", "max_position_embeddings")),
]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default="", help="run the cases whose name contains this text")
    parser.add_argument("--no-torchrun", action="store_true", help="skip the multi-rank cases")
    parser.add_argument("--keep", action="store_true", help="keep the run directories (printed)")
    args = parser.parse_args()
    cases = [c for c in CASES if args.only.lower() in c[1].lower() and not (args.no_torchrun and c[0].startswith("2"))]
    root = Path(tempfile.mkdtemp(prefix="megads-faults-"))
    lab = Lab(root)
    rows, started = [], time.monotonic()
    print(f"{len(cases)} cases in {root}", flush=True)
    try:
        for klass, name, expected, run in cases:
            case_started = time.monotonic()
            try:
                outcome = run(lab)
            except Exception as err:  # a broken case is a failed case, not a broken table
                outcome = Outcome(False, f"{type(err).__name__}: {err}"[:200])
            rows.append((klass, name, expected, outcome))
            print(f"[{'PASS' if outcome.ok else 'FAIL'}] {name} ({time.monotonic() - case_started:.0f} s): "
                  f"{outcome.observed}", flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    print()
    print("| class | case | expected | result |")
    print("|---|---|---|---|")
    for klass, name, expected, outcome in rows:
        print(f"| {klass} | {name} | {expected} | {'pass' if outcome.ok else 'FAIL: ' + outcome.observed} |")
    passed = sum(outcome.ok for *_, outcome in rows)
    print(f"\n{passed} of {len(rows)} cases behaved as expected ({time.monotonic() - started:.0f} s).")
    return 0 if passed == len(rows) else 1


if __name__ == "__main__":
    sys.exit(main())
