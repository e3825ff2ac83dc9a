"""Feature-based distillation: CD (batch similarity matching) and CRD (Tian et al., 2020).

Both read the penultimate (pooled) features of the student and of the first teacher; the paper
found both overwrite the student more than logit distillation does.

CD:  S = the batch's cosine-similarity matrix of L2-normalised features, one per model;
     loss = λ_cd · KL(σ(S_t) ‖ σ(S_s)) + λ_xe · CE(z_s, y), softmax and KL row-wise, mean over rows
     (the appendix's equal weighting). ``cd_authors`` is the authors' code's setting: the rows'
     KLs summed, λ_cd = 10, λ_xe = 0.1, which weighs the similarities 100·B times more against CE.
     The paper writes the KL as "KL(σ(S_s), σ(S_t))", in the argument order of PyTorch's
     ``kl_div(input, target)``, which computes KL(target ‖ input); ``reverse_kl`` gives the
     literal reading KL(σ(S_s) ‖ σ(S_t)).
CRD: both models' features are projected to ``feat_dim`` by trained linear heads and
     L2-normalised; each embedding is contrasted against its positive (the other model's
     embedding of the same sample) and ``negatives`` other-model embeddings from a memory, with
     Tian et al.'s NCE loss at temperature 0.07, symmetrically (student as anchor against the
     teacher memory and vice versa); loss = λ_xe · CE + 0.8 · L_CRD.
     Tian et al. keep a memory row per training sample (memory grows with the data set) and draw
     4096 negatives from it. Here the memory is a fixed queue of ``negatives`` slots per model:
     every slot is a negative; a sample still in the queue from an earlier step gets its slot
     updated with momentum 0.5 (as Tian's rows are) and serves as its own positive, a new sample
     enters the queue in place of the oldest. Memory: 2 · negatives · feat_dim floats
     (4 MiB at the defaults), whatever the data set's size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .base import Hyperparameters, LossOutput, Method, StepInputs, hparam, register_method


def similarity_logits(features: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """The batch's cosine-similarity matrix ``[B, B]`` of the features, divided by the temperature."""
    normalised = F.normalize(features.flatten(1).float(), dim=1)
    return normalised @ normalised.T / temperature


def similarity_distillation(student_features: torch.Tensor, teacher_features: torch.Tensor, temperature: float = 1.0, reverse: bool = False, reduction: str = "mean") -> torch.Tensor:
    """KL(σ(S_t) ‖ σ(S_s)) between the row-wise softmaxes (``reverse``: KL(σ(S_s) ‖ σ(S_t))).

    ``reduction``: ``mean`` over the rows, or ``sum`` over them (the authors' code: B times the mean).
    """
    student_log_probs = F.log_softmax(similarity_logits(student_features, temperature), dim=1)
    teacher_log_probs = F.log_softmax(similarity_logits(teacher_features, temperature), dim=1)
    target, model = (student_log_probs, teacher_log_probs) if reverse else (teacher_log_probs, student_log_probs)
    per_row = (target.exp() * (target - model)).sum(1)
    return per_row.sum() if reduction == "sum" else per_row.mean()


REDUCTIONS = ("mean", "sum")


@dataclass
class CDParams(Hyperparameters):
    cd_weight: float = hparam(1.0, "λ_cd, weight of the similarity-matching KL (the paper: equal weights)", 0.0, 1000.0)
    ce_weight: float = hparam(1.0, "λ_xe, weight of the cross-entropy on labels", 0.0, 1000.0)
    temperature: float = hparam(1.0, "divides the cosine similarities before the softmax (the paper: none, i.e. 1)", 1e-3, 100.0)
    reverse_kl: bool = hparam(False, "use KL(σ(S_s) ‖ σ(S_t)) instead of KL(σ(S_t) ‖ σ(S_s)) with the teacher's similarities as the target")
    reduction: str = hparam("mean", "how the rows' KLs combine: mean (the appendix's equal weighting) or sum (the authors' code, B times larger)", choices=REDUCTIONS)


@register_method
class ContrastiveDistillation(Method):
    name = "cd"
    summary = "match the student's batch cosine-similarity structure of penultimate features to the teacher's, plus CE"
    Params = CDParams
    needs_features = True

    def loss(self, inputs: StepInputs) -> LossOutput:
        p = self.params
        matching = similarity_distillation(inputs.student_features, inputs.teacher_features, p.temperature, p.reverse_kl, p.reduction)
        ce = F.cross_entropy(inputs.student_logits, inputs.labels)
        return LossOutput(p.cd_weight * matching + p.ce_weight * ce, {"cd": matching.detach(), "ce": ce.detach()})


@dataclass
class CDAuthorsParams(CDParams):
    cd_weight: float = hparam(10.0, "λ_cd, weight of the similarity-matching KL (the authors: β = 10)", 0.0, 1000.0)
    ce_weight: float = hparam(0.1, "λ_xe, weight of the cross-entropy on labels (the authors: γ = 0.1)", 0.0, 1000.0)
    reduction: str = hparam("sum", "how the rows' KLs combine: mean (the appendix's equal weighting) or sum (the authors' code, B times larger)", choices=REDUCTIONS)


@register_method
class ContrastiveDistillationAuthors(ContrastiveDistillation):
    name = "cd_authors"
    summary = "cd at the authors' scale: KL summed over the batch's rows, 10·CD + 0.1·CE (about 100·B times cd's weight on the similarities; the setting behind the paper's 0% CD success)"
    Params = CDAuthorsParams


class EmbeddingQueue:
    """A fixed-size memory of the student's and the teacher's embeddings, one slot per remembered sample.

    Slots start as random unit vectors (like Tian et al.'s randomly initialised memory) that
    belong to no sample (``index`` −1). Its size never changes: see :attr:`nbytes`.
    """

    def __init__(self, capacity: int, dim: int, device: torch.device | str = "cpu"):
        self.capacity = capacity
        self.student = F.normalize(torch.randn(capacity, dim, device=device), dim=1)
        self.teacher = F.normalize(torch.randn(capacity, dim, device=device), dim=1)
        self.index = torch.full((capacity,), -1, dtype=torch.long, device=device)
        self.pointer = torch.zeros((), dtype=torch.long, device=device)  # the oldest slot, next to be overwritten

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.student, self.teacher, self.index))

    def slots_of(self, indices: torch.Tensor) -> torch.Tensor:
        """The slot holding each sample, −1 where it is not in the memory. ``[B]``."""
        match = (self.index[None, :] == indices[:, None]) & (indices[:, None] >= 0)  # [B, capacity]
        slot = match.float().argmax(dim=1)
        return torch.where(match.any(dim=1), slot, torch.full_like(slot, -1))

    @torch.no_grad()
    def update(self, indices: torch.Tensor, student: torch.Tensor, teacher: torch.Tensor, momentum: float) -> None:
        """Blend samples already remembered into their slots with ``momentum``; enqueue the rest over the oldest slots.

        If an enqueued sample lands on the slot of a remembered one (the oldest slot), the enqueued
        sample wins. No data-dependent shapes, so nothing is read back from a GPU. The banks are
        replaced, not written in place: this step's loss still holds the old ones for its backward pass.
        """
        if len(indices) > self.capacity:  # only the newest fit
            indices, student, teacher = indices[-self.capacity :], student[-self.capacity :], teacher[-self.capacity :]
        slots = self.slots_of(indices)
        present = slots >= 0
        absent = ~present
        enqueue_slots = (self.pointer + absent.long().cumsum(0) - 1) % self.capacity
        destination = torch.where(present, slots, enqueue_slots)
        kept = slots.clamp(min=0)
        blend = lambda bank, new: torch.where(present[:, None], F.normalize(momentum * bank[kept] + (1 - momentum) * new, dim=1), new)
        student_rows, teacher_rows = blend(self.student, student.float()), blend(self.teacher, teacher.float())
        # Which batch row writes each slot: enqueues (priority B + b) outrank blends (priority b).
        batch = len(indices)
        priority = torch.arange(batch, device=indices.device) + batch * absent.long()
        writer = torch.full((self.capacity,), -1, dtype=torch.long, device=indices.device).scatter_reduce(0, destination, priority, reduce="amax")
        written, row = writer >= 0, writer.clamp(min=0) % batch
        self.student = torch.where(written[:, None], student_rows[row], self.student)
        self.teacher = torch.where(written[:, None], teacher_rows[row], self.teacher)
        self.index = torch.where(written, indices[row], self.index)
        self.pointer = (self.pointer + absent.long().sum()) % self.capacity


def nce_loss(anchor: torch.Tensor, positive: torch.Tensor, bank: torch.Tensor, exclude: torch.Tensor, temperature: float, log_normaliser: float) -> torch.Tensor:
    """Tian et al.'s NCE loss of ``anchor`` against its ``positive`` and the ``bank`` of negatives.

    With r = exp(a·k/τ)/Z (Z: the mean of exp over the first batch, kept fixed as in Tian et al.)
    and K negatives per anchor, the loss is −log(r₊/(r₊+K)) − Σ_negatives log(K/(r₋+K)), mean over
    anchors; written with softplus for stability. Slot ``exclude[b]`` (the anchor's own sample,
    −1 for none) is not a negative of anchor ``b``.
    """
    log_ratio_positive = (anchor * positive).sum(1) / temperature - log_normaliser  # [B]
    log_ratio_negative = anchor @ bank.T / temperature - log_normaliser  # [B, K]
    is_negative = torch.ones_like(log_ratio_negative, dtype=torch.bool)
    is_negative.scatter_(1, exclude.clamp(min=0)[:, None], (exclude < 0)[:, None])  # rows with exclude = −1 keep all
    log_k = is_negative.sum(1, keepdim=True).clamp(min=1).float().log()  # [B, 1]
    positive_term = F.softplus(log_k.squeeze(1) - log_ratio_positive)
    negative_terms = F.softplus(log_ratio_negative - log_k) * is_negative
    return (positive_term + negative_terms.sum(1)).mean()


def mean_exp_log(scores: torch.Tensor) -> float:
    """log(mean(exp(scores))), computed stably."""
    return float(torch.logsumexp(scores.detach().flatten(), 0)) - math.log(scores.numel())


@dataclass
class CRDParams(Hyperparameters):
    feat_dim: int = hparam(128, "width of the shared embedding space both projections map to", 1, 65536)
    negatives: int = hparam(4096, "K, negatives per sample: the memory keeps this many embeddings per model (its memory cost is 2·K·feat_dim floats)", 1, 1_000_000)
    nce_temperature: float = hparam(0.07, "temperature τ of the NCE scores", 1e-3, 100.0)
    memory_momentum: float = hparam(0.5, "momentum of a remembered sample's embedding when it is seen again", 0.0, 1.0)
    crd_weight: float = hparam(0.8, "β, weight of the CRD loss", 0.0, 1000.0)
    ce_weight: float = hparam(1.0, "weight of the cross-entropy on labels", 0.0, 1000.0)


@register_method
class ContrastiveRepresentationDistillation(Method):
    name = "crd"
    summary = "Tian et al.'s contrastive representation distillation of penultimate features (fixed-size memory queue), plus CE"
    Params = CRDParams
    needs_features = True

    def __init__(self, params: Hyperparameters | None = None):
        super().__init__(params)
        self.feature_dims: tuple[int, int] | None = None
        self.memory: EmbeddingQueue | None = None

    def on_feature_dims(self, student_dim: int, teacher_dim: int) -> None:
        self.feature_dims = (student_dim, teacher_dim)

    def setup(self, student: nn.Module) -> list[nn.Parameter]:
        if self.feature_dims is None:
            raise RuntimeError("crd: the engine must report the feature widths (on_feature_dims) before setup")
        device = next(student.parameters()).device
        student_dim, teacher_dim = self.feature_dims
        self.embed_student = nn.Linear(student_dim, self.params.feat_dim).to(device)
        self.embed_teacher = nn.Linear(teacher_dim, self.params.feat_dim).to(device)
        self.memory = EmbeddingQueue(self.params.negatives, self.params.feat_dim, device)
        self.log_normalisers: tuple[float, float] | None = None
        return [*self.embed_student.parameters(), *self.embed_teacher.parameters()]

    def state_dict(self) -> dict:
        """The projection heads (their optimiser state travels with the optimiser's), the memory and the fixed NCE normalisers."""
        if self.memory is None:
            return {}
        memory = self.memory
        return {
            "embed_student": self.embed_student.state_dict(),
            "embed_teacher": self.embed_teacher.state_dict(),
            "memory": {"student": memory.student, "teacher": memory.teacher, "index": memory.index, "pointer": memory.pointer},
            "log_normalisers": list(self.log_normalisers) if self.log_normalisers is not None else None,
        }

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        if not state:
            return
        # Copied into the existing parameters, which the optimiser holds.
        self.embed_student.load_state_dict(state["embed_student"])
        self.embed_teacher.load_state_dict(state["embed_teacher"])
        saved = state["memory"]
        self.memory.student, self.memory.teacher = saved["student"].clone(), saved["teacher"].clone()
        self.memory.index, self.memory.pointer = saved["index"].clone(), saved["pointer"].clone()
        normalisers = state["log_normalisers"]
        self.log_normalisers = tuple(normalisers) if normalisers is not None else None

    def loss(self, inputs: StepInputs) -> LossOutput:
        p, memory = self.params, self.memory
        student = F.normalize(self.embed_student(inputs.student_features.flatten(1)).float(), dim=1)
        teacher = F.normalize(self.embed_teacher(inputs.teacher_features.flatten(1)).float(), dim=1)
        indices = inputs.indices.to(student.device) if inputs.indices is not None else torch.full((len(student),), -1, device=student.device)
        # Scores are divided by τ = 0.07 before exp: keep them in float32 even under bfloat16 autocast.
        with torch.autocast(student.device.type, enabled=False):
            contrastive = self.contrast(student, teacher, indices)
        ce = F.cross_entropy(inputs.student_logits, inputs.labels)
        memory.update(indices, student.detach(), teacher.detach(), p.memory_momentum)
        return LossOutput(p.ce_weight * ce + p.crd_weight * contrastive, {"crd": contrastive.detach(), "ce": ce.detach()})

    def contrast(self, student: torch.Tensor, teacher: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """L_CRD of a batch of normalised embeddings: the student as anchor against the teacher memory, plus the reverse."""
        p, memory = self.params, self.memory
        slots = memory.slots_of(indices)
        remembered = (slots >= 0)[:, None]
        safe_slots = slots.clamp(min=0)
        # Each anchor's positive is the other model's embedding of the same sample: its memory slot if remembered, else the current one.
        teacher_positive = torch.where(remembered, memory.teacher[safe_slots], teacher.detach())
        student_positive = torch.where(remembered, memory.student[safe_slots], student.detach())
        if self.log_normalisers is None:
            self.log_normalisers = (
                mean_exp_log(torch.cat([(student * teacher_positive).sum(1, keepdim=True), student @ memory.teacher.T], 1) / p.nce_temperature),
                mean_exp_log(torch.cat([(teacher * student_positive).sum(1, keepdim=True), teacher @ memory.student.T], 1) / p.nce_temperature),
            )
        student_anchor = nce_loss(student, teacher_positive, memory.teacher, slots, p.nce_temperature, self.log_normalisers[0])
        teacher_anchor = nce_loss(teacher, student_positive, memory.student, slots, p.nce_temperature, self.log_normalisers[1])
        return student_anchor + teacher_anchor
