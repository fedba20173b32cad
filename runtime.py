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
# --cuda-graph: a training step replayed from a CUDA graph


def why_no_graph(device, world_size, scaler, compiled):
    """Why --cuda-graph cannot capture this run's steps (a reason for the log), or None when it can."""
    if device.type != "cuda":
        return f"CUDA only, this run is on {device.type}"
    if world_size > 1:
        return "one process only (DDP's gradient all-reduce is not captured)"
    if scaler.is_enabled():
        return "fp16's gradient scaler reads its overflow flag on the host every step"
    return "--compile makes its own graphs" if compiled else None


class StepGraph:
    """A whole training step, fn(images, labels) -> {name: detached tensor} (forward, backward and
    optimizer.step()), captured once in a CUDA graph and then replayed: one launch a step instead of the
    hundreds a small model's eager step makes, which bound its speed (ResNet-32 on CIFAR, bf16, an H200).

    The first `warmup` calls run fn eagerly on a side stream (cuDNN picks its kernels, the optimizer makes
    its momentum buffers), the next captures fn and every later call copies its batch into the graph's input
    tensors and replays. A replay computes what fn would (the same kernels, the same random numbers) as long
    as what changes between steps lives in tensors: the learning rates are copied from the optimizer's
    param_groups (Python floats, as saved in checkpoints) into tensors its fused step reads, and `generator`
    is registered with the graph, so that seeding it before a call seeds the replay. Inputs must keep their
    shapes (the sampler's batches all have 2S rows). The returned tensors are overwritten by the next call.

    Args:
        fn: the step; optimizer: the SGD it calls (fused=True: it takes tensor learning rates);
        generator: the CUDA generator fn draws from; warmup: eager calls before the capture (default: 3).
    """

    def __init__(self, fn, optimizer, generator, warmup=3):
        self.fn, self.optimizer, self.generator, self.warmup = fn, optimizer, generator, warmup
        self.graph, self.calls = None, 0

    def __call__(self, images, labels):
        if self.calls < self.warmup:  # eager, on a side stream as the capture will be
            self.calls += 1
            side, main = torch.cuda.Stream(), torch.cuda.current_stream()
            side.wait_stream(main)
            with torch.cuda.stream(side):
                out = self.fn(images, labels)
            main.wait_stream(side)
            return out
        if self.graph is None:
            self.capture(images, labels)
        self.inputs[0].copy_(images, non_blocking=True)
        self.inputs[1].copy_(labels, non_blocking=True)
        for lr, group in zip(self.lrs, self.optimizer.param_groups):
            lr.fill_(group["lr"])
        self.graph.replay()
        return self.outputs

    def capture(self, images, labels):
        """Record fn on input tensors of this batch's shapes; nothing runs (the caller replays)."""
        device = self.generator.device
        self.inputs = (torch.empty_like(images, device=device), torch.empty_like(labels, device=device))
        # float32 on the parameters' device: what the fused kernel reads there (a CPU one would be baked in)
        self.lrs = [torch.tensor(float(g["lr"]), dtype=torch.float32, device=g["params"][0].device if
                                 g["params"] else device) for g in self.optimizer.param_groups]
        floats = [g["lr"] for g in self.optimizer.param_groups]
        for group, lr in zip(self.optimizer.param_groups, self.lrs):
            group["lr"] = lr  # the fused SGD kernel reads the rate from this tensor at every replay
        self.optimizer.zero_grad(set_to_none=True)  # the graph's backward makes its own .grad tensors
        graph = torch.cuda.CUDAGraph()
        graph.register_generator_state(self.generator)
        try:  # thread_local: a loader's pin-memory thread may call CUDA meanwhile
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                self.outputs = self.fn(*self.inputs)
        except RuntimeError as e:
            cause = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise LTauxError(f"--cuda-graph: the training step could not be captured in a CUDA graph "
                             f"({cause}); run without --cuda-graph") from e
        finally:
            for group, lr in zip(self.optimizer.param_groups, floats):
                group["lr"] = lr  # floats again for the checkpoints and the log
        self.graph = graph


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
