"""Task losses of the "pick the most similar target" formulation (pure functions)."""

import math

import torch
import torch.nn.functional as F


def similarity_logits(inputs_ND: torch.Tensor, targets_MD: torch.Tensor, log_scale: torch.Tensor,
                      max_scale: float = 100.0) -> torch.Tensor:
    """Cosine similarity of L2-normalised features times a learned temperature ``exp(log_scale)``, capped.

    The cap is applied to the log-scale (clamp, then exp) so the temperature stops growing at ``max_scale``.
    """
    scale = log_scale.clamp(max=math.log(max_scale)).exp()
    return scale * F.normalize(inputs_ND, dim=-1) @ F.normalize(targets_MD, dim=-1).t()


def classification_loss(logits_NM: torch.Tensor, labels_N: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Cross-entropy against the encoded class-name targets."""
    return F.cross_entropy(logits_NM.float(), labels_N, label_smoothing=label_smoothing)


def soft_target_cross_entropy(logits_NM: torch.Tensor, targets_NM: torch.Tensor) -> torch.Tensor:
    """Cross-entropy against target distributions (mixup/cutmix, with their label smoothing)."""
    return -(targets_NM * F.log_softmax(logits_NM.float(), dim=-1)).sum(dim=-1).mean()


def contrastive_loss(logits_NN: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Symmetric InfoNCE over in-batch negatives: mean of input->target and target->input cross-entropy."""
    labels = torch.arange(logits_NN.shape[0], device=logits_NN.device)
    logits_NN = logits_NN.float()
    return 0.5 * (F.cross_entropy(logits_NN, labels, label_smoothing=label_smoothing)
                  + F.cross_entropy(logits_NN.t(), labels, label_smoothing=label_smoothing))


def gathered_contrastive_loss(local_a_BD: torch.Tensor, local_b_BD: torch.Tensor, all_a_ND: torch.Tensor,
                              all_b_ND: torch.Tensor, rank: int, log_scale: torch.Tensor,
                              label_smoothing: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric InfoNCE of this rank's pairs against every rank's (negatives gathered across ranks, CLIP-style):
    local a vs all b and local b vs all a; pair i of this rank sits at row ``rank * B + i`` of the gathered sets.
    Returns ``(loss, a->b logits [B, N])``."""
    batch = local_a_BD.shape[0]
    labels = torch.arange(batch, device=local_a_BD.device) + rank * batch
    a2b = similarity_logits(local_a_BD, all_b_ND, log_scale).float()
    b2a = similarity_logits(local_b_BD, all_a_ND, log_scale).float()
    loss = 0.5 * (F.cross_entropy(a2b, labels, label_smoothing=label_smoothing)
                  + F.cross_entropy(b2a, labels, label_smoothing=label_smoothing))
    return loss, a2b
