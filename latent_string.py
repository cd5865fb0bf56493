"""Latent Hierarchy (LH) classifier: an LSTM that emits a binary string per image, with the
class-to-string code learnt end to end by Class2Str and Str2Class networks.

Paper: the Latent Hierarchy Classifier / Class2Str paper (../shared/papers/latent_string.txt), Sections III-VI,
Tables I and III, Figs. 1, 5-8. The full account of every reading, deviation and finding, and the commands:
docs/latent_string.md.

    python latent_string.py                                                            # shapes, VGG16 features
    python latent_string.py --dataset cifar100 --data-dir /root/data --val-per-class 50  # Table III, CIFAR-100
    python latent_string.py --dataset cifar100 --data-dir data --base-from RUN --lh-seed 1  # stage 2 on RUN's extractor

Pipeline (main): data (optional validation split) -> stage 1, the base model of Table I (trained, or --base-from)
-> its frozen features, cached once -> stage 2 on the cached features: the LH classifier with Class2Str and
Str2Class by Eq. 5,
    alpha H(l, l') + beta sum_i mu^i H(p_i, q_i) - gamma sum_i (q_i(0)^2 + q_i(1)^2) + delta L2(W)
-> the one-to-one check and repair -> the random code, the reduced FC and the L / LSTM-size sweeps -> test time
per image -> metrics.json, class_codes.json, prefix_tree.txt, bits_sweep.tsv, hidden_sweep.tsv (Table III beside
the paper's: python tools/results_table.py --run RUN_DIR).

Paper vs ours, one line per decision (docs/latent_string.md, "Paper vs ours", has the reasoning):
- base-model training not given: SGD 0.05, step lr, 100 epochs, crop + flip on colour images: get_args, train_base
- shapes gets the CIFAR-100 LH sizes, at most 10 classes the CIFAR-10 ones: default_lh_sizes
- Table I's "in - h1 - h2": two stacked LSTM layers (counts above the paper's); Linear + LSTM: --lh-input-proj
- the feature vector is every step's input, no bit fed back; one fused nn.LSTM call: LHClassifier, --lstm-impl
- Class2Str / Str2Class with a ReLU hidden layer (activation not given): Class2Str, Str2Class
- H(p_i, q_i) with the Class2Str code as the target; mu^i from i = 1; batch means; L2 on weights only: eq5_loss
- alpha 10, beta 1, gamma 0.1, delta 1e-4 (not given); Adam 1e-3, batch 128, 50 epochs, fp32: --alpha .. --lh-*
- Str2Class reads the soft q (Fig. 3); the hard s(q), straight-through: --code-input hard
- a code that is not one to one is repaired and trained on (not in the paper): repair_code, --repair
- stage 2 sees un-augmented cached features; seeded afresh with --lh-seed: cache_features, stage2_seed
- a control without recurrence (not in the paper): --lh-head mlp, BitMLP
- reduced FC (Table III): one hidden layer with the LH's parameter count, Adam: reduced_fc_hidden, train_reduced_fc
- random-embedding ablation: distinct random strings replace Class2Str, same Eq. 5: random_code, FixedCode
- L sweep (Fig. 8) and LSTM-size sweep (Fig. 7): --bits-sweep, --hidden-sweep
- no validation in the paper; --val-per-class N reports on a held-out split, nothing selected on test
- test time per image: eager and CUDA-graph, batch 512 and 1: test_time, --cuda-graph
"""

import argparse
import itertools
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import common

# Table I: LSTM hidden sizes of the LH classifier and the hidden width of Class2Str / Str2Class.
TABLE1_LH = {"mnist": ((10, 10), 500), "cifar10": ((20, 20), 500), "cifar100": ((40, 40), 1000)}
BASE_GROUP = "base model (stage 1)"  # base_flags() reads this group: every flag in it must match for --base-from


def get_args(argv=None):
    parser = make_parser()
    # A resume may lengthen the LH stages, not the base model: they are trained on its features.
    # A --dry-run's own default (flag not given): one epoch after a code repair, like every other stage.
    args = common.parse_args(
        parser, argv, script="latent_string", resume_longer=("lh_epochs",), dry_run={"repair_epochs": 1}
    )
    check_args(parser, args)
    return args


def make_parser():
    """Every flag, one line each; the longer account of each is in docs/latent_string.md, "Flags"."""
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    common.add_common_args(parser, epochs=100, batch_size=128, lr=0.05, dataset="shapes")
    b = parser.add_argument_group(BASE_GROUP)
    g = parser.add_argument_group("LH classifier, Class2Str, Str2Class (stage 2, Eq. 5)")
    p = parser.add_argument_group("paper fidelity and ablations (docs/latent_string.md)")
    pos, posf, nonneg, text = common.positive_int, common.positive_float, common.nonneg_float, common.nonempty
    b.add_argument("--backbone", default="auto", choices=("auto", "vgg16", "lenet"), help="auto: Table I's per dataset")
    b.add_argument("--momentum", type=common.fraction, default=0.9)
    b.add_argument("--weight-decay", type=nonneg, default=5e-4)
    b.add_argument("--dropout", type=common.fraction, default=0.5, help="VGG FC dropout")
    b.add_argument("--augment", action=argparse.BooleanOptionalAction, default=True, help="crop + flip, colour only")
    b.add_argument("--val-per-class", type=common.nonneg_int, default=0, help="hold out N train images per class")
    b.add_argument("--base-from", type=text, metavar="RUN_DIR", help="reuse an earlier run's base model (checked)")
    g.add_argument("--bits", type=pos, default=None, help="string length L (default ceil(log2 C))")
    g.add_argument("--lstm-hidden", type=text, help="comma list of LSTM layer sizes (default from Table I)")
    g.add_argument("--code-hidden", type=pos, default=None, help="Class2Str / Str2Class hidden width (Table I)")
    g.add_argument("--alpha", type=nonneg, default=10.0, help="weight of H(l, l') (Str2Class)")
    g.add_argument("--beta", type=nonneg, default=1.0, help="weight of sum mu^i H(p_i, q_i)")
    g.add_argument("--gamma", type=nonneg, default=0.1, help="weight of the bias regulariser (Eq. 3)")
    g.add_argument("--delta", type=nonneg, default=1e-4, help="weight of L2(W)")
    g.add_argument("--mu", type=posf, default=0.8, help="decay of the per-bit weights mu^i (Eq. 4)")
    p.add_argument("--code-input", default="soft", choices=("soft", "hard"), help="Str2Class reads q, or s(q) (ST)")
    p.add_argument("--repair", action=argparse.BooleanOptionalAction, default=True, help="make the code one to one")
    g.add_argument("--lstm-impl", default="fused", choices=("fused", "steps"), help="one nn.LSTM call, or a loop")
    p.add_argument("--repair-epochs", type=pos, default=10, help="epochs of LH training after a code repair")
    p.add_argument("--lh-input-proj", action=argparse.BooleanOptionalAction, default=False, help="Linear + LSTM")
    p.add_argument("--lh-head", default="lstm", choices=("lstm", "mlp"), help="mlp: a control without recurrence")
    g.add_argument("--lh-epochs", type=pos, default=50)
    g.add_argument("--lh-lr", type=posf, default=1e-3, help="Adam learning rate")
    p.add_argument("--lh-schedule", default="constant", choices=("constant", "step"), help="step: /10 at 50%%, 75%%")
    g.add_argument("--lh-seed", type=common.seed_int, default=None, help="seed of stage 2; default --seed")
    g.add_argument("--lh-batch-size", type=pos, default=128)
    p.add_argument("--bits-sweep", type=text, default="auto", help="L for Fig. 8, comma list; auto: L0-1 .. L0+2; none")
    p.add_argument("--hidden-sweep", type=text, default="auto", help="LSTM sizes (Fig. 7): list; auto h/4..4h; none")
    return parser


def check_args(parser, args):
    """Range checks get_args leaves to after parsing; parses the comma lists into args.lstm_hidden_sizes,
    args.sweep_bits and args.sweep_hidden."""
    if args.bits is not None and not 1 <= args.bits <= 20:
        parser.error("--bits must be between 1 and 20")
    if not 0 < args.mu <= 1:
        parser.error("--mu must be in (0, 1]")
    try:
        args.lstm_hidden_sizes = parse_int_list(args.lstm_hidden) if args.lstm_hidden else None
        if args.bits_sweep in ("auto", "none"):
            args.sweep_bits = args.bits_sweep
        else:
            args.sweep_bits = parse_int_list(args.bits_sweep)
        if args.hidden_sweep in ("auto", "none"):
            args.sweep_hidden = args.hidden_sweep
        else:
            args.sweep_hidden = parse_int_list(args.hidden_sweep)
    except ValueError as e:
        parser.error(str(e))
    if args.lstm_hidden_sizes is not None and min(args.lstm_hidden_sizes) < 1:
        parser.error("--lstm-hidden sizes must be positive")
    if isinstance(args.sweep_bits, list) and not all(1 <= b <= 20 for b in args.sweep_bits):
        parser.error("--bits-sweep values must be between 1 and 20")
    if isinstance(args.sweep_hidden, list) and not all(h >= 1 for h in args.sweep_hidden):
        parser.error("--hidden-sweep sizes must be positive")


def parse_int_list(text):
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"expected a comma list of integers, got {text!r}") from None


# ---------------------------------------------------------------------------------------
# The method, part 1: the LH classifier (LSTM), Class2Str, Str2Class, the fixed code, the reduced FC
# ---------------------------------------------------------------------------------------


class LHClassifier(nn.Module):
    """The Latent Hierarchy classifier: a stacked LSTM run for L steps with the same feature vector
    as the input of every step, a shared FC hidden -> 2 and a softmax per step. Returns log p:
    B x L x 2.

    No predicted bit is fed back: the earlier bits reach later steps through the LSTM state only
    (Section III: "the input is fed into a recurrent neural network repeated for L time steps").
    So the L steps are one fused nn.LSTM call per layer over the input repeated L times (cuDNN on
    CUDA, no host sync, CUDA-graph capturable); `forward_steps` is the same computation as an
    explicit step loop (the reference the tests compare against).

    input_proj (Table I read as "in - h1 - h2" = Linear(in, h1), then LSTM layers h1 -> h2 ...):
    a linear projection of the features to the first size, then LSTM layers between the sizes.
    Without it every size is an LSTM layer, the first one reading the features directly.

    Runs in fp32 whatever the surrounding autocast (it is tiny; bf16 buys nothing here)."""

    def __init__(self, in_features, hidden=(20, 20), bits=4, input_proj=False, impl="fused"):
        super().__init__()
        self.bits, self.hidden, self.input_proj, self.impl = bits, tuple(hidden), input_proj, impl
        if input_proj:
            self.proj = nn.Linear(in_features, self.hidden[0])
            sizes = self.hidden if len(self.hidden) > 1 else self.hidden * 2
        else:
            self.proj = None
            sizes = (in_features,) + self.hidden
        self.layers = nn.ModuleList(nn.LSTM(a, b, batch_first=True) for a, b in zip(sizes[:-1], sizes[1:]))
        self.out = nn.Linear(sizes[-1], 2)

    def _inputs(self, features):
        x = features.float()
        return self.proj(x) if self.proj is not None else x

    def forward(self, features):
        if self.impl == "steps":
            return self.forward_steps(features)
        with torch.autocast(features.device.type, enabled=False):
            seq = self._inputs(features).unsqueeze(1).expand(-1, self.bits, -1).contiguous()
            for lstm in self.layers:
                seq, _ = lstm(seq)
            return self.out(seq).log_softmax(-1)

    def forward_steps(self, features):
        """The step loop: LSTM cell equations written out, one step and one layer at a time."""
        with torch.autocast(features.device.type, enabled=False):
            x0 = self._inputs(features)
            states = [(x0.new_zeros(len(x0), m.hidden_size), x0.new_zeros(len(x0), m.hidden_size)) for m in self.layers]
            steps = []
            for _ in range(self.bits):
                x = x0
                for k, m in enumerate(self.layers):
                    h, c = states[k]
                    gates = x @ m.weight_ih_l0.T + m.bias_ih_l0 + h @ m.weight_hh_l0.T + m.bias_hh_l0
                    i, f, g, o = gates.chunk(4, 1)
                    c = f.sigmoid() * c + i.sigmoid() * g.tanh()
                    h = o.sigmoid() * c.tanh()
                    states[k] = (h, c)
                    x = h
                steps.append(self.out(x))
            return torch.stack(steps, 1).log_softmax(-1)


class BitMLP(nn.Module):
    """A control for the LH classifier, not in the paper: the L bits at once from one hidden layer
    (features -> width -> 2L, a softmax per bit), no recurrence; width chosen so that it has the
    parameter count of the LH classifier it stands in for. Returns log p: B x L x 2, as LHClassifier."""

    def __init__(self, in_features, width, bits):
        super().__init__()
        self.bits = bits
        self.net = nn.Sequential(nn.Linear(in_features, width), nn.ReLU(), nn.Linear(width, 2 * bits))

    def forward(self, features):
        with torch.autocast(features.device.type, enabled=False):
            return self.net(features.float()).view(-1, self.bits, 2).log_softmax(-1)


def bit_mlp_width(param_budget, in_features, bits):
    """Width of in -> width -> 2L whose parameter count is closest to the budget."""
    return max(1, round((param_budget - 2 * bits) / (in_features + 1 + 2 * bits)))


class Class2Str(nn.Module):
    """One-hot label -> per-bit distributions q: B x L x 2 (Fig. 3, left)."""

    def __init__(self, num_classes, hidden, bits):
        super().__init__()
        self.bits = bits
        self.net = nn.Sequential(nn.Linear(num_classes, hidden), nn.ReLU(), nn.Linear(hidden, 2 * bits))

    def forward(self, one_hot):
        return self.net(one_hot).view(-1, self.bits, 2).softmax(-1)


class FixedCode(nn.Module):
    """The random-embedding ablation: a fixed lookup table of strings in place of Class2Str."""

    def __init__(self, code_bits):
        super().__init__()
        self.register_buffer("q_table", F.one_hot(code_bits.long(), 2).float())  # C x L x 2
        self.bits = code_bits.shape[1]

    def forward(self, one_hot):
        return torch.einsum("bc,clk->blk", one_hot, self.q_table)


class Str2Class(nn.Module):
    """Concatenated per-bit distributions (2L) -> class logits (Fig. 3, middle)."""

    def __init__(self, num_classes, hidden, bits):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(2 * bits, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))

    def forward(self, q):
        return self.net(q.flatten(1))


class LHStage(nn.Module):
    """What stage 2 trains: the LH classifier with Class2Str (or a fixed code) and Str2Class."""

    def __init__(self, classifier, class2str, str2class, num_classes):
        super().__init__()
        self.classifier, self.class2str, self.str2class = classifier, class2str, str2class
        self.num_classes = num_classes


class ReducedFC(nn.Module):
    """An FC classifier features -> hidden -> C with a given parameter budget (Table III)."""

    def __init__(self, in_features, num_classes, hidden):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_features, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))

    def forward(self, features):
        return self.net(features)


class FeatureLoader:
    """Batches of cached feature vectors held on the device (the GpuLoader interface)."""

    def __init__(self, features, labels, batch_size, *, device, train=False, seed=0, max_batches=None):
        self.device = torch.device(device)
        self.features, self.labels = features.to(self.device), labels.to(self.device)
        self.batch_size, self.train, self.max_batches = batch_size, train, max_batches
        self.generator = torch.Generator(device=self.device).manual_seed(seed)
        if train and len(self.features) < batch_size:
            common.fail(
                f"a training set of {len(self.features)} feature vectors is smaller than one batch of {batch_size}"
            )

    def __len__(self):
        n = len(self.features)
        batches = n // self.batch_size if self.train else math.ceil(n / self.batch_size)
        return min(batches, self.max_batches) if self.max_batches else batches

    def state_dict(self):
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state):
        self.generator.set_state(state["generator"].cpu())  # a checkpoint mapped to the GPU holds it there

    def __iter__(self):
        n = len(self.features)
        order = (
            torch.randperm(n, device=self.device, generator=self.generator)
            if self.train
            else torch.arange(n, device=self.device)
        )
        for i in range(len(self)):
            idx = order[i * self.batch_size : (i + 1) * self.batch_size]
            yield self.features[idx], self.labels[idx]


# ---------------------------------------------------------------------------------------
# The method, part 2: the base model, Eq. 5, the code, its metrics and repair, the stage-2 trainings
# ---------------------------------------------------------------------------------------


def default_lh_sizes(dataset, num_classes):
    """Table I's LSTM sizes and Class2Str/Str2Class width; other datasets by class count."""
    if dataset in TABLE1_LH:
        return TABLE1_LH[dataset]
    return TABLE1_LH["cifar10"] if num_classes <= 10 else TABLE1_LH["cifar100"]


def default_bits(num_classes):
    return max(1, math.ceil(math.log2(num_classes)))


def build_base_model(args, data):
    """The base model of Table I: feature extractor + FC classifier."""
    channels, size = data.train.images.shape[1], data.train.images.shape[-1]
    backbone = args.backbone if args.backbone != "auto" else ("lenet" if data.name == "mnist" else "vgg16")
    if backbone == "lenet":
        if size != 28:
            common.fail(f"--backbone lenet needs 28x28 images (Table I: 64 x 7 x 7 = 3136 features), got {size}x{size}")
        return LeNetMNIST(data.num_classes, hidden=500, in_channels=channels), backbone
    if size < 32:
        common.fail(f"--backbone vgg16 has five 2x2 pools and needs images of at least 32 pixels, got {size}")
    return common.VGG(16, data.num_classes, hidden=(1024, 1024), dropout=args.dropout, in_channels=channels), backbone


# The shared flags that make the data, the split and the base model's training; with every flag
# of the base-model group (base_flags), a run reusing another run's base (--base-from) must agree
# on them all, or its validation images could be the base's training ones.
COMMON_BASE_FLAGS = (
    "dataset",
    "hierarchy",
    "image_size",
    "train_size",
    "test_size",
    "seed",
    "epochs",
    "batch_size",
    "lr",
    "dtype",
    "dry_run",
)


def base_flags():
    """Every flag that makes the base model: the shared ones above and the base-model group's."""
    group = next(g for g in make_parser()._action_groups if g.title == BASE_GROUP)
    return COMMON_BASE_FLAGS + tuple(a.dest for a in group._group_actions if a.dest != "base_from")


def load_base_from(base, args, device):
    """Load the finished base model of the run in args.base_from into `base` (one line on a mismatch)."""
    run_dir = Path(args.base_from)
    saved = common.read_run_args(run_dir, "--base-from")
    common.check_run_script(saved, "latent_string", run_dir, "--base-from")
    settings = common.run_settings(saved)
    differ = [f for f in base_flags() if settings.get(f) != getattr(args, f)]
    if differ:
        common.fail(
            f"--base-from {run_dir}: its base model was made with other "
            + ", ".join(
                f"--{f.replace('_', '-')} ({settings.get(f)!r} there, {getattr(args, f)!r} here)" for f in differ
            )
        )
    path = run_dir / "base" / "checkpoint.pt"
    if not path.is_file():
        common.fail(f"--base-from {run_dir}: no base/checkpoint.pt there (its base model was not trained yet)")
    ckpt = common.load_checkpoint(path, device)
    if ckpt.get("epoch") != args.epochs:
        common.fail(f"--base-from {run_dir}: its base model stopped at epoch {ckpt.get('epoch')} of {args.epochs}")
    common.load_weights(base, ckpt.get("model", {}), f"--base-from {path}")
    print(f"[base] the trained base model of {run_dir} (epoch {ckpt['epoch']})", flush=True)


def freeze(module):
    """Freeze a module for good: no gradients, eval mode (BN statistics and dropout fixed)."""
    module.requires_grad_(False)
    return module.eval()


def weight_matrices(module):
    """Every weight matrix (dim > 1) of a module; biases excluded."""
    return [p for p in module.parameters() if p.dim() > 1]


def str2class_input(q, code_input):
    """What Str2Class reads: the soft q (Fig. 3 as drawn) or, with "hard", the one-hot string s(q)
    with a straight-through gradient (forward: the argmax bits; backward: the gradient of q)."""
    if code_input == "soft":
        return q
    hard = F.one_hot(q.argmax(-1), 2).to(q.dtype)
    return hard + q - q.detach()


def eq5_loss(stage, features, labels, *, alpha, beta, gamma, delta, mu, code_input="soft"):
    """Eq. 5: alpha H(l, l') + beta sum_i mu^i H(p_i, q_i) - gamma sum_i (q_i(0)^2 + q_i(1)^2)
    + delta L2(W); batch terms are batch means. Returns (loss, stats)."""
    log_p = stage.classifier(features)  # B x L x 2
    one_hot = torch.eye(stage.num_classes, device=labels.device)[labels]  # indexing: no host sync
    q = stage.class2str(one_hot).float()  # B x L x 2
    label_ce = F.cross_entropy(stage.str2class(str2class_input(q, code_input)).float(), labels)
    bit_weights = mu ** torch.arange(1, q.shape[1] + 1, device=q.device, dtype=torch.float32)
    bit_ce = -(q * log_p).sum(-1)  # B x L: H with the code q as the target
    structured = (bit_ce * bit_weights).sum(1).mean()
    bias = (q**2).sum((1, 2)).mean()
    l2 = sum((w.float() ** 2).sum() for w in weight_matrices(stage))
    loss = alpha * label_ce + beta * structured - gamma * bias + delta * l2
    correct = (log_p.argmax(-1) == q.argmax(-1)).all(1).sum()  # s(p) == s(q), all bits
    return loss, {
        "label_ce": label_ce.detach(),
        "structured": structured.detach(),
        "bias": bias.detach(),
        "l2": l2.detach(),
        "correct": correct,
    }


def reduced_fc_loss(model, features, labels):
    return common.cross_entropy_loss(model, features, labels)


@torch.no_grad()
def class_code_bits(class2str, num_classes, device):
    """s(q) of every class (Eq. 1): C x L in {0, 1}, on the CPU."""
    q = class2str(torch.eye(num_classes, device=device))
    return q.argmax(-1).cpu()


def bits_to_int(bits):
    """Rows of bits (first bit most significant) -> integers."""
    bits = torch.as_tensor(bits).long()
    weights = 2 ** torch.arange(bits.shape[-1] - 1, -1, -1, device=bits.device)
    return (bits * weights).sum(-1)


def code_string(bits_row):
    return "".join(str(int(b)) for b in bits_row)


def duplicate_groups(code_bits):
    """Lists of classes (>= 2) that share a string, sorted."""
    groups = {}
    for c, value in enumerate(bits_to_int(code_bits).tolist()):
        groups.setdefault(value, []).append(c)
    return sorted(g for g in groups.values() if len(g) > 1)


NO_MATCH, AMBIGUOUS = -1, -2


def lookup_table(code_bits):
    """Tensor of size 2^L: string -> class, NO_MATCH for strings of no class, AMBIGUOUS for
    strings shared by several classes."""
    bits = code_bits.shape[1]
    table = torch.full((2**bits,), NO_MATCH, dtype=torch.long)
    for c, value in enumerate(bits_to_int(code_bits).tolist()):
        table[value] = c if table[value] == NO_MATCH else AMBIGUOUS
    return table


def string_metrics(pred_bits, labels, code_bits):
    """Test-time evaluation of predicted strings s(p) against the class lookup table.

    exact_match: all bits equal the true class's string (the paper's rule). lookup: the table
    returns the true class (a string shared by several classes is ambiguous and wrong)."""
    pred_bits, labels, code_bits = pred_bits.long(), labels.long(), code_bits.long()
    true_bits = code_bits[labels]  # N x L
    bit_ok = pred_bits == true_bits
    predicted = lookup_table(code_bits)[bits_to_int(pred_bits)]
    return {
        "exact_match_acc": 100.0 * bit_ok.all(1).float().mean().item(),
        "lookup_acc": 100.0 * (predicted == labels).float().mean().item(),
        "per_bit_acc": (100.0 * bit_ok.float().mean(0)).tolist(),
        "prefix_acc": (100.0 * bit_ok.long().cumprod(1).float().mean(0)).tolist(),
        "no_match_rate": 100.0 * (predicted == NO_MATCH).float().mean().item(),
        "ambiguous_rate": 100.0 * (predicted == AMBIGUOUS).float().mean().item(),
    }


def prefix_tree(code_bits, class_names):
    """The learnt hierarchy (Figs. 1, 5): the prefix tree of the class strings, as text."""
    strings = [code_string(row) for row in code_bits]
    bits = len(strings[0]) if strings else 0
    lines = ["(root)"]

    def walk(prefix, indent):
        children = sorted({s[len(prefix)] for s in strings if s.startswith(prefix)})
        for k, b in enumerate(children):
            last = k == len(children) - 1
            node = prefix + b
            branch = "└── " if last else "├── "
            if len(node) == bits:
                members = [n for n, s in zip(class_names, strings) if s == node]
                flag = "   <-- DUPLICATE: one string, several classes" if len(members) > 1 else ""
                lines.append(f"{indent}{branch}{node}  {', '.join(members)}{flag}")
            else:
                lines.append(f"{indent}{branch}{node}")
                walk(node, indent + ("    " if last else "│   "))

    walk("", "")
    return "\n".join(lines)


def common_prefix_length(a, b):
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def hierarchy_prefix_agreement(code_bits, hierarchy):
    """Per known coarse level: mean longest common prefix of class pairs with the same parent
    vs pairs with different parents (a learnt code that follows the hierarchy gives the
    first the larger value)."""
    strings = [code_string(row) for row in code_bits]
    result = {}
    for level, name in enumerate(hierarchy.level_names[:-1]):
        parent = hierarchy.parents[level]
        same, other = [], []
        for i, j in itertools.combinations(range(len(strings)), 2):
            (same if parent[i] == parent[j] else other).append(common_prefix_length(strings[i], strings[j]))
        result[name] = {
            "same_parent_mean_lcp": float(np.mean(same)) if same else None,
            "different_parent_mean_lcp": float(np.mean(other)) if other else None,
        }
    return result


def cache_features(base, images, labels, args, data, device):
    """Features of the frozen extractor for a split, in order, no augmentation: N x D on the device."""
    loader = common.GpuLoader(
        images,
        labels,
        512,
        device=device,
        mean=data.mean,
        std=data.std,
        train=False,
        max_batches=2 if args.dry_run else None,
    )
    features, labels = common.predict(base.features, loader, device=device, dtype=args.dtype)
    return features.to(device), labels.to(device)


@torch.no_grad()
def predict_log_p(classifier, features, labels, device):
    """log p (N x L x 2) of the LH classifier over cached features, and the labels, on the CPU."""
    loader = FeatureLoader(features, labels, 1024, device=device)
    return common.predict(classifier, loader, device=device, dtype="fp32")


def class_log_scores(log_p, code_bits):
    """Class scores from the bit probabilities: log P(string of class c) = sum_i log p_i(code_c,i),
    N x C (for the score-based metrics; the paper's decision rule is the exact-match lookup)."""
    return torch.einsum("nlk,clk->nc", log_p.float(), F.one_hot(code_bits.long(), 2).float())


def repair_code(code_bits, q):
    """Make a code one to one. In every group of classes that share a string, the class whose q is
    most confident (mean over bits of max_b q_i(b)) keeps the string; each other class moves to the
    free string with the longest common prefix with its old one (it stays in the same subtree),
    ties broken by the fewest differing bits, then the smallest string.

    Returns (new code C x L, [(class, old string, new string)]); ValueError when 2^L < C."""
    C, L = code_bits.shape
    if 2**L < C:
        raise ValueError(f"{C} classes cannot have distinct strings of {L} bits")
    values = bits_to_int(code_bits).numpy()
    confidence = q.float().max(-1).values.mean(-1).cpu().numpy()
    taken, movers, new = set(), [], values.copy()
    for c in np.argsort(-confidence, kind="stable"):
        if values[c] in taken:
            movers.append(c)
        else:
            taken.add(int(values[c]))
    all_strings = np.arange(2**L)
    moves = []
    for c in movers:
        free = all_strings[~np.isin(all_strings, list(taken))]
        xor = free ^ values[c]
        bit_length = np.zeros_like(xor)
        hamming = np.zeros_like(xor)
        for k in range(L):
            bit = (xor >> k) & 1
            bit_length = np.where(bit == 1, k + 1, bit_length)
            hamming += bit
        lcp = L - bit_length
        best = free[np.lexsort((free, hamming, -lcp))[0]]
        new[c] = best
        taken.add(int(best))
        moves.append((int(c), code_string(code_bits[c]), format(int(best), f"0{L}b")))
    bits = (torch.as_tensor(new)[:, None] >> torch.arange(L - 1, -1, -1)) & 1
    return bits.long(), moves


def stage2_seed(args):
    """The seed of everything after the frozen extractor (--lh-seed, else --seed)."""
    return args.seed if args.lh_seed is None else args.lh_seed


def stage2_lr_at(args, total_steps):
    """Adam's learning rate by step for one stage-2 training of total_steps (--lh-schedule)."""
    if args.lh_schedule == "constant":
        return lambda step: args.lh_lr
    return common.piecewise_lr(
        [total_steps // 2, total_steps * 3 // 4], [args.lh_lr, args.lh_lr / 10, args.lh_lr / 100]
    )


def train_lh_stage(name, stage, cached, args, run_dir, device, epochs=None):
    """Stage 2 (or an ablation of it): Adam on Eq. 5 over the cached features."""
    stage = common.to_device_model(stage, device)
    loader = FeatureLoader(
        *cached["train"],
        args.lh_batch_size,
        device=device,
        train=True,
        seed=stage2_seed(args),
        max_batches=2 if args.dry_run else None,
    )
    params = [p for p in stage.parameters() if p.requires_grad]
    optimizer = common.make_adam(params, args.lh_lr, device=device)
    hyper = dict(
        alpha=args.alpha, beta=args.beta, gamma=args.gamma, delta=args.delta, mu=args.mu, code_input=args.code_input
    )
    step = common.make_train_step(
        stage,
        lambda m, x, y: eq5_loss(m, x, y, **hyper),
        optimizer,
        device=device,
        dtype="fp32",
        cuda_graph=args.cuda_graph,
        compile=args.compile,
    )

    def evaluate(epoch):
        codes = class_code_bits(stage.class2str, stage.num_classes, device)
        record = {"distinct_strings": len(set(bits_to_int(codes).tolist()))}
        if "val" in cached:
            log_p, labels = predict_log_p(stage.classifier, *cached["val"], device)
            m = string_metrics(log_p.argmax(-1), labels, codes)
            record.update(val_acc=m["exact_match_acc"], val_lookup_acc=m["lookup_acc"])
        return record

    epochs = epochs or args.lh_epochs
    common.fit(
        run_dir / name,
        stage,
        optimizer,
        step,
        loader,
        epochs=epochs,
        lr_at=stage2_lr_at(args, epochs * len(loader)),
        evaluate=evaluate,
        log_path=run_dir / "metrics.jsonl",
        stage=name,
    )
    return stage


def lh_results(stage, cached, args, device):
    """Learnt codes, duplicates and test metrics of a trained LH stage; also the class scores
    (N x C, test) for the score-based metrics."""
    codes = class_code_bits(stage.class2str, stage.num_classes, device)
    log_p, labels = predict_log_p(stage.classifier, *cached["test"], device)
    result = {
        "bits": codes.shape[1],
        **string_metrics(log_p.argmax(-1), labels, codes),
        "duplicate_strings": duplicate_groups(codes),
    }
    if "val" in cached:
        val_log_p, val_labels = predict_log_p(stage.classifier, *cached["val"], device)
        val = string_metrics(val_log_p.argmax(-1), val_labels, codes)
        result.update(val_exact_match_acc=val["exact_match_acc"], val_lookup_acc=val["lookup_acc"])
    return result, codes, class_log_scores(log_p, codes)


def train_lh_model(name, cached, args, run_dir, device, *, sizes, bits, hidden, fixed_code=None):
    """Train an LH stage; if its learnt code is not one to one (and --repair, and 2^L >= C), repair
    the code (repair_code) and train the LH classifier on by --repair-epochs with the repaired code
    fixed (stage <name>_repaired). sizes: (feature dim, number of classes, Class2Str/Str2Class width).
    Returns (result, codes, test class scores, stage)."""
    in_features, C, code_hidden = sizes

    def make(code):
        return make_lh_stage(
            in_features,
            C,
            bits,
            hidden,
            code_hidden,
            code,
            input_proj=args.lh_input_proj,
            impl=args.lstm_impl,
            head=args.lh_head,
        )

    stage = train_lh_stage(name, make(fixed_code), cached, args, run_dir, device)
    result, codes, scores = lh_results(stage, cached, args, device)
    if fixed_code is not None or not result["duplicate_strings"] or not args.repair or 2**bits < C:
        return result, codes, scores, stage
    with torch.no_grad():
        q = stage.class2str(torch.eye(C, device=device)).cpu()
    repaired, moves = repair_code(codes, q)
    fixed = make(repaired)
    fixed.classifier.load_state_dict(stage.classifier.state_dict())
    drop_stale_repair(run_dir, name)
    fixed = train_lh_stage(f"{name}_repaired", fixed, cached, args, run_dir, device, epochs=args.repair_epochs)
    after, codes, scores = lh_results(fixed, cached, args, device)
    keys = ("exact_match_acc", "lookup_acc", "duplicate_strings") + (("val_lookup_acc",) if "val" in cached else ())
    after["before_repair"] = {k: result[k] for k in keys}
    after["repair_moves"] = moves
    return after, codes, scores, fixed


def drop_stale_repair(run_dir, name):
    """A repaired stage is made from the LH stage as it was: when the LH stage has logged epochs
    since the repair's last one (a resume with a longer --lh-epochs), the repair's checkpoint (a
    file of ours) goes and the repair is made again from the longer LH stage."""
    stages = [r.get("stage") for r in common.read_jsonl(run_dir / "metrics.jsonl")]
    repaired = [i for i, s in enumerate(stages) if s == f"{name}_repaired"]
    checkpoint = run_dir / f"{name}_repaired" / "checkpoint.pt"
    if repaired and name in stages[repaired[-1] :] and checkpoint.exists():
        print(f"[{name}_repaired] made from a shorter {name} stage; repairing the code again", flush=True)
        checkpoint.unlink()


def make_lh_stage(
    in_features, num_classes, bits, hidden, code_hidden, fixed_code=None, input_proj=False, impl="fused", head="lstm"
):
    classifier = LHClassifier(in_features, hidden, bits, input_proj=input_proj, impl=impl)
    if head == "mlp":  # the control: as many parameters as that LSTM, no recurrence
        classifier = BitMLP(in_features, bit_mlp_width(common.count_params(classifier), in_features, bits), bits)
    class2str = FixedCode(fixed_code) if fixed_code is not None else Class2Str(num_classes, code_hidden, bits)
    return LHStage(classifier, class2str, Str2Class(num_classes, code_hidden, bits), num_classes)


def random_code(num_classes, bits, seed):
    """Distinct random L-bit strings, one per class (one to one when 2^L >= C)."""
    rng = np.random.default_rng(seed)
    values = rng.choice(2**bits, size=num_classes, replace=2**bits < num_classes)
    return ((torch.as_tensor(values)[:, None] >> torch.arange(bits - 1, -1, -1)) & 1).long()


def reduced_fc_hidden(param_budget, in_features, num_classes):
    """Hidden width of in -> h -> C whose parameter count is closest to the budget."""
    per_unit = in_features + 1 + num_classes
    return max(1, round((param_budget - num_classes) / per_unit))


def train_reduced_fc(hidden, cached, in_features, num_classes, args, run_dir, device):
    model = common.to_device_model(ReducedFC(in_features, num_classes, hidden), device)
    loader = FeatureLoader(
        *cached["train"],
        args.lh_batch_size,
        device=device,
        train=True,
        seed=stage2_seed(args),
        max_batches=2 if args.dry_run else None,
    )
    optimizer = common.make_adam(model.parameters(), args.lh_lr, device=device)
    step = common.make_train_step(
        model, reduced_fc_loss, optimizer, device=device, dtype="fp32", cuda_graph=args.cuda_graph, compile=args.compile
    )

    def evaluate(epoch):
        if "val" not in cached:
            return {}
        logits, labels = common.predict(
            model, FeatureLoader(*cached["val"], 1024, device=device), device=device, dtype="fp32"
        )
        return {"val_acc": common.accuracy(logits, labels)}

    common.fit(
        run_dir / "reduced_fc",
        model,
        optimizer,
        step,
        loader,
        epochs=args.lh_epochs,
        lr_at=stage2_lr_at(args, args.lh_epochs * len(loader)),
        evaluate=evaluate,
        log_path=run_dir / "metrics.jsonl",
        stage="reduced_fc",
    )
    return model


def train_base(base, data, train_split, val_split, args, run_dir, device):
    """Stage 1: the base model (extractor + FC classifier) with cross-entropy and SGD."""
    augment = args.augment and data.name != "mnist"
    loader = common.GpuLoader(
        train_split.images,
        train_split.labels,
        args.batch_size,
        device=device,
        mean=data.mean,
        std=data.std,
        train=True,
        crop_pad=4 if augment else 0,
        flip=augment,
        seed=args.seed,
        max_batches=2 if args.dry_run else None,
    )
    optimizer = common.make_sgd(base.parameters(), args.lr, momentum=args.momentum, weight_decay=args.weight_decay)
    total = args.epochs * len(loader)
    lr_at = common.piecewise_lr([total // 2, total * 3 // 4], [args.lr, args.lr / 10, args.lr / 100])
    step = common.make_train_step(
        base,
        common.cross_entropy_loss,
        optimizer,
        device=device,
        dtype=args.dtype,
        cuda_graph=args.cuda_graph,
        compile=args.compile,
    )
    evaluate = None
    if val_split is not None:
        val_loader = common.GpuLoader(
            val_split.images,
            val_split.labels,
            512,
            device=device,
            mean=data.mean,
            std=data.std,
            max_batches=2 if args.dry_run else None,
        )

        def evaluate(epoch):
            logits, labels = common.predict(base, val_loader, device=device, dtype=args.dtype)
            return {"val_acc": common.accuracy(logits, labels)}

    common.fit(
        run_dir / "base",
        base,
        optimizer,
        step,
        loader,
        epochs=args.epochs,
        lr_at=lr_at,
        evaluate=evaluate,
        log_path=run_dir / "metrics.jsonl",
        stage="base",
    )


EVAL_BATCH = 512  # the batch of every evaluation pass over images (cache_features)


def capture_cuda_graph(forward, x, device, dtype):
    """Capture forward(x) (inference) in one CUDA graph; returns replay(x) -> output."""
    static_x = x.clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side), torch.no_grad():
        for _ in range(3):  # warm-up on a side stream, as capture requires
            with common.autocast(device, dtype):
                forward(static_x)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.no_grad(), torch.cuda.graph(graph), common.autocast(device, dtype, cache_enabled=False):
        static_out = forward(static_x)

    def replay(images):
        static_x.copy_(images)
        graph.replay()
        return static_out

    return replay


def test_time(base, classifier, table, data, args, device):
    """Test time of the base model (extractor + FC, argmax) vs extractor + LH classifier + lookup
    (Table III, last column): images/s at the evaluation batch and batch-1 latency, eager and, on
    CUDA with --cuda-graph, with each whole forward captured in one CUDA graph."""
    n = min(EVAL_BATCH, len(data.test))
    loader = common.GpuLoader(
        data.test.images[:n], data.test.labels[:n], n, device=device, mean=data.mean, std=data.std
    )
    x, _ = next(iter(loader))
    table = table.to(device)

    def fc_forward(images):
        return base(images).argmax(1)

    def lh_forward(images):
        return table[bits_to_int(classifier(base.features(images)).argmax(-1))]

    # A few passes on CPU (where the timing is no claim of the paper's), 50 on a GPU.
    iters, warmup = (2, 1) if args.dry_run or torch.device(device).type == "cpu" else (50, 5)
    modes = {"eager": lambda f, batch: f}
    if torch.device(device).type == "cuda" and args.cuda_graph:
        modes["cuda_graph"] = lambda f, batch: capture_cuda_graph(f, batch, device, args.dtype)
    result = {"eval_batch": n}
    for mode, wrap in modes.items():
        for name, forward in (("fc", fc_forward), ("lh", lh_forward)):
            for batch_name, batch in (("eval_batch", x), ("batch1", x[:1])):
                try:
                    f = wrap(forward, batch)
                except RuntimeError as e:  # reported in metrics.json and printed, not hidden
                    print(f"warning: CUDA graph capture of the {name} forward failed: {e}", file=sys.stderr, flush=True)
                    result[f"{mode}_error"] = str(e)
                    continue
                ips = common.measure_throughput(f, batch, device=device, dtype=args.dtype, iters=iters, warmup=warmup)
                if batch_name == "eval_batch":
                    result[f"{mode}_{name}_images_per_s"] = ips
                else:
                    result[f"{mode}_{name}_batch1_ms"] = 1000.0 / ips
        fc_key, lh_key = f"{mode}_fc_images_per_s", f"{mode}_lh_images_per_s"
        if fc_key in result and lh_key in result:
            # Table III's "reduction in test time per image": 1 - t_LH / t_FC.
            result[f"{mode}_test_time_reduction_pct"] = 100.0 * (1 - result[fc_key] / result[lh_key])
    best = "cuda_graph" if "cuda_graph_test_time_reduction_pct" in result else "eager"
    result["test_time_reduction_pct"] = result[f"{best}_test_time_reduction_pct"]
    result["test_time_mode"] = best
    return result


def sweep_hidden_list(args, lstm_hidden):
    if args.sweep_hidden == "none":
        return []
    if args.sweep_hidden == "auto":
        h = lstm_hidden[-1]
        return sorted({max(1, h // 4), max(1, h // 2), h, 2 * h, 4 * h})
    return sorted(set(args.sweep_hidden))


def sweep_bits_list(args, bits):
    if args.sweep_bits == "none":
        return []
    if args.sweep_bits == "auto":
        return [b for b in range(bits - 1, bits + 3) if b >= 1]
    return sorted(set(args.sweep_bits))


# ---------------------------------------------------------------------------------------
# The MNIST backbone: the LeNet of Table I
# ---------------------------------------------------------------------------------------


class LeNetMNIST(common.Backbone):
    """The MNIST network of the latent-string paper: conv 16 - pool - conv 32 - pool - conv 64,
    flattened to 64 x 7 x 7 = 3136 features, then FC 3136-500-10."""

    def __init__(self, num_classes=10, hidden=500, in_channels=1):
        super().__init__()
        self.stem = nn.Identity()
        self.stages = nn.ModuleList(
            [
                nn.Sequential(nn.Conv2d(in_channels, 16, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2)),
                nn.Sequential(nn.Conv2d(16, 32, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2)),
                nn.Sequential(nn.Conv2d(32, 64, 5, padding=2), nn.ReLU()),
            ]
        )
        self.head = FlattenHead(64 * 7 * 7, num_classes, hidden)
        common.init_weights(self)


class FlattenHead(nn.Module):
    """Flatten (no pooling), then FC hidden-ReLU-FC."""

    def __init__(self, cin, num_classes, hidden):
        super().__init__()
        self.hidden = nn.Sequential(nn.Linear(cin, hidden), nn.ReLU())
        self.out = nn.Linear(hidden, num_classes)

    def pool(self, x):
        return torch.flatten(x, 1)

    def fc(self, x):
        return self.out(self.hidden(x))

    def forward(self, x):
        return self.fc(self.pool(x))


# ---------------------------------------------------------------------------------------
# The pipeline's steps (main)
# ---------------------------------------------------------------------------------------


def lh_settings(args, data):
    """L (default ceil(log2 C), a warning when 2^L < C) and the Table I sizes, unless given."""
    C = data.num_classes
    if C < 2:
        common.fail(f"{data.name} has {C} class; the LH classifier needs at least 2")
    bits = args.bits or default_bits(C)
    if 2**bits < C:
        print(
            f"warning: L = {bits} bits give {2**bits} strings for {C} classes; some classes must share a string",
            file=sys.stderr,
            flush=True,
        )
    lstm_hidden, code_hidden = default_lh_sizes(data.name, C)
    lstm_hidden = tuple(args.lstm_hidden_sizes or lstm_hidden)
    code_hidden = args.code_hidden or code_hidden
    return bits, lstm_hidden, code_hidden


def train_val_split(args, data):
    """--val-per-class N images per class held out of train (None: no validation split)."""
    train_split, val_split = data.train, None
    if args.val_per_class:
        val_idx, train_idx = common.stratified_split(data.train.labels.numpy(), args.val_per_class, args.seed)
        train_split, val_split = data.train.subset(train_idx), data.train.subset(val_idx)
    return train_split, val_split


def cache_all_features(base, train_split, val_split, args, data, device):
    """The frozen extractor's features of train, test (and val), computed once: {split: (features, labels)}."""
    t0 = time.time()
    cached = {
        "train": cache_features(base, train_split.images, train_split.labels, args, data, device),
        "test": cache_features(base, data.test.images, data.test.labels, args, data, device),
    }
    if val_split is not None:
        cached["val"] = cache_features(base, val_split.images, val_split.labels, args, data, device)
    print(
        f"cached {cached['train'][0].shape[1]}-d features of {sum(len(v[1]) for v in cached.values())} images "
        f"in {time.time() - t0:.1f}s",
        flush=True,
    )
    return cached


def warn_shared_strings(lh, names):
    if lh["duplicate_strings"]:
        shared = "; ".join(", ".join(names[c] for c in g) for g in lh["duplicate_strings"])
        print(
            f"warning: {len(lh['duplicate_strings'])} strings are shared by several classes: {shared}",
            file=sys.stderr,
            flush=True,
        )


def run_sweeps(cached, args, run_dir, device, *, sizes, bits, lstm_hidden, lh, lh_params):
    """The L sweep (Fig. 8) and the LSTM size sweep (Fig. 7); the default L / size is the `lh` stage, reused."""

    def sweep_row(result):
        row = {
            "exact_match_acc": result["exact_match_acc"],
            "lookup_acc": result["lookup_acc"],
            "n_duplicate_groups": len(result["duplicate_strings"]),
            "n_duplicate_groups_before_repair": len(result.get("before_repair", result)["duplicate_strings"]),
        }
        if "val" in cached:
            row["val_lookup_acc"] = result["val_lookup_acc"]
        return row

    bits_sweep = []
    for b in sweep_bits_list(args, bits):
        if b == bits:
            result = lh
        else:
            result = train_lh_model(
                f"lh_bits{b}", cached, args, run_dir, device, sizes=sizes, bits=b, hidden=lstm_hidden
            )[0]
        bits_sweep.append({"bits": b, **sweep_row(result)})
    hidden_sweep = []
    for h in sweep_hidden_list(args, lstm_hidden):
        sweep_hidden = (h,) * len(lstm_hidden)
        if sweep_hidden == lstm_hidden:
            result, n_params = lh, lh_params
        else:
            result, _, _, sweep_stage = train_lh_model(
                f"lh_hidden{h}", cached, args, run_dir, device, sizes=sizes, bits=bits, hidden=sweep_hidden
            )
            n_params = common.count_params(sweep_stage.classifier)
        hidden_sweep.append({"hidden": h, "lh_params": n_params, **sweep_row(result)})
    return bits_sweep, hidden_sweep


def main(argv=None):
    # 1. Settings and data: L, the Table I sizes, the optional validation split.
    args = get_args(argv)
    run_dir, device = common.setup(args, "latent_string")
    if args.dry_run:
        args.lh_epochs = 1
    started = time.time()
    data = common.load_data(args)
    C = data.num_classes
    bits, lstm_hidden, code_hidden = settings = lh_settings(args, data)
    train_split, val_split = train_val_split(args, data)

    # 2. Stage 1: the base model (Table I), trained or taken from --base-from, frozen; its features cached once.
    base, backbone = build_base_model(args, data)
    base = common.to_device_model(base, device)
    if args.base_from:
        load_base_from(base, args, device)
    else:
        train_base(base, data, train_split, val_split, args, run_dir, device)
    freeze(base)
    cached = cache_all_features(base, train_split, val_split, args, data, device)
    feature_dim = cached["train"][0].shape[1]
    test_loader = FeatureLoader(*cached["test"], 1024, device=device)
    fc_out = common.predict(base.head.fc, test_loader, device=device, dtype=args.dtype)  # (logits, labels)

    # 3. Stage 2: the LH classifier with Class2Str and Str2Class (Eq. 5), its code repaired if needed.
    # Seeded afresh, so that stage 2 is the same whether the base was trained here or taken from
    # --base-from, and --lh-seed varies it alone on one frozen extractor.
    common.seed_everything(stage2_seed(args))
    sizes = (feature_dim, C, code_hidden)
    lh_out = train_lh_model("lh", cached, args, run_dir, device, sizes=sizes, bits=bits, hidden=lstm_hidden)
    lh, _, _, stage = lh_out
    warn_shared_strings(lh, data.class_names)

    # 4. The random-embedding ablation and the reduced FC classifier of Table III.
    fixed = random_code(C, bits, stage2_seed(args))
    random_out = train_lh_model(
        "random_code", cached, args, run_dir, device, sizes=sizes, bits=bits, hidden=lstm_hidden, fixed_code=fixed
    )
    lh_params = common.count_params(stage.classifier)
    hidden = reduced_fc_hidden(lh_params, feature_dim, C)
    reduced = train_reduced_fc(hidden, cached, feature_dim, C, args, run_dir, device)
    test_loader = FeatureLoader(*cached["test"], 1024, device=device)
    reduced_out = (hidden, reduced, common.predict(reduced, test_loader, device=device, dtype="fp32")[0])

    # 5. The L sweep (Fig. 8) and the LSTM size sweep (Fig. 7), on the same cached features.
    sweeps = run_sweeps(
        cached, args, run_dir, device, sizes=sizes, bits=bits, lstm_hidden=lstm_hidden, lh=lh, lh_params=lh_params
    )

    # 6. Test time per image and the metrics; the run's files (metrics.json, the code, the prefix tree, the sweeps).
    metrics = collect_metrics(
        args, data, device, settings, base, backbone, cached, fc_out, lh_out, random_out, reduced_out, sweeps
    )
    metrics["seconds"] = time.time() - started
    report(run_dir, metrics, data, lh_out, sweeps)
    return metrics


# ---------------------------------------------------------------------------------------
# Reports: metrics.json's content, the run's files and the summary, the sweeps' TSV
# ---------------------------------------------------------------------------------------


def collect_metrics(
    args, data, device, settings, base, backbone, cached, fc_out, lh_out, random_out, reduced_out, sweeps
):
    """metrics.json's content (all but `seconds`); measures the test time per image (test_time) on the way."""
    bits, lstm_hidden, code_hidden = settings
    fc_logits, test_labels = fc_out
    lh, codes, lh_scores, stage = lh_out
    random_result, random_codes, random_scores, _ = random_out
    hidden, reduced, reduced_logits = reduced_out
    bits_sweep, hidden_sweep = sweeps
    names = data.class_names
    lh_params = common.count_params(stage.classifier)
    fc_params = common.count_params(base.head)
    metrics = {
        "dataset": data.name + (" (JPEG q75 copy)" if data.name == "cifar10" else ""),
        "num_classes": data.num_classes,
        "bits": bits,
        "backbone": backbone,
        "feature_dim": cached["train"][0].shape[1],
        "lstm_hidden": list(lstm_hidden),
        "code_hidden": code_hidden,
        "base_from": str(Path(args.base_from).resolve()) if args.base_from else None,
        "fc_test_acc": common.accuracy(fc_logits, test_labels),
        "lh_test_acc": lh["exact_match_acc"],
        "lh": lh,
        "reduced_fc_hidden": hidden,
        "reduced_fc_test_acc": common.accuracy(reduced_logits, test_labels),
        "random_code": {**random_result, "codes": [code_string(r) for r in random_codes]},
        "random_code_drop": lh["exact_match_acc"] - random_result["exact_match_acc"],
        "params": {
            "fc_classifier": fc_params,
            "lh_classifier": lh_params,
            "reduced_fc_classifier": common.count_params(reduced),
            "reduction_pct": 100.0 * (1 - lh_params / fc_params),
            "class2str": common.count_params(stage.class2str),
            "str2class": common.count_params(stage.str2class),
            "feature_extractor": common.count_params(base) - fc_params,
        },
        "codes": {n: code_string(r) for n, r in zip(names, codes)},
        "duplicate_class_names": [[names[c] for c in g] for g in lh["duplicate_strings"]],
        "bits_sweep": bits_sweep,
        "hidden_sweep": hidden_sweep,
        "throughput": test_time(base, stage.classifier, lookup_table(codes), data, args, device),
    }
    if data.hierarchy.n_levels > 1:
        # Does the learnt tree group similar classes? Mean common-prefix length of same-parent pairs vs
        # other pairs, for the learnt code and, as the chance level, for the random code.
        metrics["hierarchy_prefix_agreement"] = hierarchy_prefix_agreement(codes, data.hierarchy)
        metrics["random_code"]["hierarchy_prefix_agreement"] = hierarchy_prefix_agreement(random_codes, data.hierarchy)
    # Flat and hierarchical measures from each model's class scores (the LH models: log P(class string)
    # from the bit probabilities, so their top1 here decodes to the most probable class string, where
    # exact_match_acc / lookup_acc follow the paper's all-bits rule).
    metrics["hierarchical_metrics"] = {
        name: common.hierarchical_metrics(scores, test_labels, data.hierarchy)
        for name, scores in (
            ("fc", fc_logits),
            ("lh", lh_scores),
            ("reduced_fc", reduced_logits.log_softmax(1)),
            ("random_code", random_scores),
        )
    }
    return metrics


def report(run_dir, metrics, data, lh_out, sweeps):
    """metrics.json, class_codes.json, prefix_tree.txt, bits_sweep.tsv, hidden_sweep.tsv, and a few lines of summary
    (Table III beside the paper's: python tools/results_table.py --run RUN_DIR)."""
    lh, codes = lh_out[:2]
    bits_sweep, hidden_sweep = sweeps
    common.write_json(run_dir / "metrics.json", metrics)
    common.write_json(
        run_dir / "class_codes.json",
        {"codes": metrics["codes"], "duplicates": metrics["duplicate_class_names"]},
    )
    common.write_text(run_dir / "prefix_tree.txt", prefix_tree(codes, data.class_names) + "\n")
    common.write_text(run_dir / "bits_sweep.tsv", sweep_tsv("bits", bits_sweep))
    common.write_text(run_dir / "hidden_sweep.tsv", sweep_tsv("hidden", hidden_sweep))
    shared = "; ".join(", ".join(g) for g in metrics["duplicate_class_names"]) or "none"
    print(
        f"[latent_string] test: FC {metrics['fc_test_acc']:.2f}  LH {lh['exact_match_acc']:.2f} (lookup "
        f"{lh['lookup_acc']:.2f})  reduced FC {metrics['reduced_fc_test_acc']:.2f}  LH random code "
        f"{metrics['random_code']['exact_match_acc']:.2f} | classes sharing a string: {shared}\n"
        f"per-bit accuracy: {' '.join(f'{a:.1f}' for a in lh['per_bit_acc'])}\n"
        f"done in {common.format_seconds(metrics['seconds'])}; results in {run_dir} (prefix_tree.txt, the sweeps' "
        "TSVs; Table III beside the paper's: python tools/results_table.py --run DIR)",
        flush=True,
    )


def sweep_tsv(key, rows):
    """A sweep as TSV: the swept value, then every numeric column of the rows."""
    if not rows:
        return ""
    columns = [key] + [k for k in rows[0] if k != key]

    def fmt(v):
        return f"{v:.2f}" if isinstance(v, float) else str(v)

    return "\t".join(columns) + "\n" + "".join("\t".join(fmt(r[k]) for k in columns) + "\n" for r in rows)


if __name__ == "__main__":
    main()
