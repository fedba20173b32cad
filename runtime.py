"""What train.py, evaluate.py and bench.py share at run time besides the method (ltaux.py), the input
pipeline (pipeline.py) and the run's files (bookkeeping.py): user errors, device and precision, evaluation.
"""

import sys

import torch
import torch.distributed as dist

import pipeline
import recipes
from ltaux import LTauxError

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}


# ----------------------------------------------------------------------------------------------
# user errors: one line, exit status 2


def report(error):
    """Print a user error on one line (also one re-raised from a DataLoader worker); exit status 2."""
    msg = str(error).strip()
    if "Original Traceback" in msg:  # keep the worker's own message, not its traceback
        msg = msg.splitlines()[-1].replace("ltaux.LTauxError: ", "")
    print(f"error: {msg}", file=sys.stderr, flush=True)
    return 2


def check_thresholds(many, few):
    """--many / --few of train.py and evaluate.py: 1 <= many, 0 <= few < many. Raises LTauxError."""
    if not (isinstance(many, int) and isinstance(few, int) and 0 <= few < many):
        raise LTauxError(f"--many {many} --few {few}: need whole numbers with 0 <= --few < --many "
                         "(many-shot: at least --many training images, few-shot: at most --few)")


# ----------------------------------------------------------------------------------------------
# device and precision


def choose_device(name=None, local_rank=0):
    """torch.device for --device (None: cuda when available); LTauxError if CUDA is asked but absent."""
    kind = name or ("cuda" if torch.cuda.is_available() else "cpu")
    if kind == "cuda" and not torch.cuda.is_available():
        raise LTauxError("--device cuda: no CUDA device is available (torch.cuda.is_available() is False)")
    return torch.device(f"cuda:{local_rank}" if kind == "cuda" else "cpu")


def cpu_runs_bf16():
    """Whether this CPU computes bf16 natively (AVX-512 BF16 or AMX, as torch's oneDNN reports it). Where
    it does not, oneDNN emulates bf16 and a ResNet step runs more than 10x slower than in fp32."""
    try:
        return torch.backends.mkldnn.is_available() and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a torch build without the query
        return False


def amp_dtype(amp, device):
    """--amp bf16|fp16|off|None -> (name, dtype or None); None: bf16 on CUDA or if cpu_runs_bf16, else off."""
    amp = amp or ("bf16" if device.type == "cuda" or cpu_runs_bf16() else "off")
    return amp, AMP_DTYPES[amp]


class NarrowInputConv2d(torch.nn.Conv2d):
    """nn.Conv2d, but in fp32 (autocast suspended) for a CPU input under autocast narrower or lower than the
    stride: there oneDNN's bf16 weight-gradient kernel reads uninitialised memory for the taps that see only
    padding (NaN or wrong gradients; docs/implementation.md). Such inputs are tiny (e.g. (B, 256, 1, 1)), so
    fp32 costs nothing. Input (B, C_in, H, W) -> (B, C_out, H', W')."""

    def forward(self, x):
        if x.is_cpu and (x.shape[-1] < self.stride[1] or x.shape[-2] < self.stride[0]) \
                and torch.is_autocast_enabled("cpu"):
            with torch.autocast("cpu", enabled=False):
                return super().forward(x.float())
        return super().forward(x)


def guard_narrow_convs(model, device):
    """On a CPU device, make every strided nn.Conv2d of model a NarrowInputConv2d, in place (the same
    parameters and state_dict keys; DDP and torch.compile work as before); on CUDA leave it. Returns model."""
    if device.type == "cpu":
        for m in model.modules():
            if type(m) is torch.nn.Conv2d and max(m.stride) > 1:
                m.__class__ = NarrowInputConv2d
    return model


# ----------------------------------------------------------------------------------------------
# evaluation


@torch.inference_mode()
def predict(model, loader, device, amp=None, features=False, stop=None):
    """Predictions and labels of an evaluation loader, gathered in list order: (N,), (N,); under torchrun
    each rank holds its shard (items rank::W) and all ranks get the whole list. With features=True also
    returns phi's features (N, D) (single process only). stop(): a callable run after every batch (all
    ranks together), which raises to end the evaluation (StopFlag.raise_if_agreed)."""
    model.eval()
    preds, targets, feats = [], [], []
    for images, labels in loader:
        with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            f = model.features(pipeline.to_device(images, device))  # (B, D)
            logits = model.fc(f)  # (B, C): phi and h, the deployed model
        preds.append(logits.argmax(1))
        targets.append(labels.to(device))
        if features:
            feats.append(f.float().cpu())
        if stop is not None:
            stop()
    pred, target = torch.cat(preds), torch.cat(targets)
    if dist.is_initialized() and dist.get_world_size() > 1:
        pred, target = gather_interleaved(pred, target, dist.get_world_size())
    return (pred.cpu(), target.cpu()) + ((torch.cat(feats),) if features else ())


def gather_interleaved(pred, target, world_size):
    """Shard r holds items r::W of the list: gather the (padded) shards of all ranks and interleave."""
    n = torch.tensor([len(pred)], device=pred.device)
    sizes = [torch.zeros_like(n) for _ in range(world_size)]
    dist.all_gather(sizes, n)
    size, total = max(int(s) for s in sizes), sum(int(s) for s in sizes)
    both = torch.stack([pred, target])
    both = torch.cat([both, both.new_full((2, size - len(pred)), -1)], 1)  # (2, size)
    gathered = [torch.empty_like(both) for _ in range(world_size)]
    dist.all_gather(gathered, both)
    # rank r's i-th item is item i * W + r: (2, size, W) row-major is list order, its padding at the end
    out = torch.stack(gathered, 2).reshape(2, -1)[:, :total]
    return out[0], out[1]


def format_table(rows):
    """rows: {run name: metrics} -> a Markdown table of many / medium / few / overall / mean per class
    (percent, - where a shot group has no classes)."""
    keys = ("many", "medium", "few", "overall", "mean_per_class")
    lines = ["| run | many | medium | few | overall | mean per class |", "|---|---|---|---|---|---|"]
    lines += ["| " + " | ".join([name] + ["-" if m[k] is None else f"{m[k]:.1f}" for k in keys]) + " |"
              for name, m in rows.items()]
    return "\n".join(lines)


def paper_lines(acc, paper):
    """Two more rows for format_table's table: the paper's row (recipes.paper_row) and the run's difference
    to it, marked when the run's protocol differs from the recipe's."""
    if paper is None:
        return ""
    note = f" (a different protocol: {', '.join(paper['differs'])})" if paper["differs"] else ""
    cells = [f"{paper[k]:.1f}" for k in recipes.CELLS]
    diff = ["-" if v is None else f"{v:+.1f}" for v in recipes.paper_difference(acc, paper).values()]
    return (f"\n| {paper['name']}{note} | " + " | ".join(cells) + " | - |"
            f"\n| difference (run - paper) | " + " | ".join(diff) + " | - |")
