"""The reference pass of DPO: summed response log-probabilities of every pair, once, into a sidecar.

Run at the start of a DPO run (``setup_training``) when the data has no sidecar yet, with the
run's own model at its starting weights (``training.initial_load``), its own parallel layout and
precision, so the first step sees ``pi == ref`` exactly (loss ``log 2``). Every pair of the
dataset (all splits) is scored: global batches of ``micro_batch_size * num_microbatches * dp``
pairs are split over data-parallel ranks as the sampler does, the last one padded by wrapping
around (padding is not written). The per-rank results are summed over the pipeline group (only
the last stage computed them) and the data-parallel group, and rank 0 writes the file.
"""

from __future__ import annotations

import numpy as np
import torch

from megatron_lite.data.batching import collate_samples, make_batch
from megatron_lite.data.indexed_dataset import DatasetError
from megatron_lite.data.preference import load_ref_logps, ref_logps_path, save_ref_logps
from megatron_lite.training.data import to_device
from megatron_lite.training.objectives import sequence_logps


def _microbatch(dataset, pair_ids: list[int], cfg, eod: int, device):
    samples = collate_samples([dataset.pair(p) for p in pair_ids])  # rows 2i, 2i + 1
    d = cfg.data
    batch = make_batch(
        samples["tokens"],
        eod,
        d.reset_position_ids,
        d.reset_attention_mask,
        d.eod_mask_loss,
        sample_loss_mask=samples["loss_mask"],
    )
    return to_device(batch, device)


def _score(trainer, batches: list, ids: list[list[int]], out: torch.Tensor) -> None:
    """Write the summed log-probs of microbatch ``j``'s pairs ``ids[j]`` into ``out`` [pairs, 2]."""

    def record(logits: torch.Tensor, mb) -> None:
        j = next(i for i, b in enumerate(batches) if b is mb)
        logps = sequence_logps(logits, mb.labels, mb.loss_mask, trainer.model).reshape(-1, 2)  # [mbs, 2]
        for k, p in enumerate(ids[j]):
            if p < out.shape[0]:  # wrapped-around padding is not written
                out[p] = logps[k]

    if trainer.pipeline is not None:  # forward only; ``record`` runs on the last stage

        def loss_fn(logits, mb):
            record(logits, mb)
            zero = logits.new_zeros((), dtype=torch.float32)
            return zero, zero

        trainer.pipeline.forward(batches, loss_fn)
        return
    for mb in batches:
        kwargs = {"position_ids": mb.position_ids, "cu_seqlens": mb.cu_seqlens, "max_seqlen": mb.max_seqlen}
        record(trainer.model(mb.tokens, **kwargs), mb)


@torch.no_grad()
def compute_reference_logps(trainer, dataset, eod: int) -> np.ndarray:
    """fp32 ``[pairs, 2]`` summed log-probs of every pair's chosen and rejected response.

    Args:
        trainer: the run's ``Trainer`` (model at its starting weights, runtime, pipeline step).
        dataset: any split's ``PreferenceDataset`` (all share the indexed data).
        eod: end-of-document id (batch construction flags follow ``data.*``).
    """
    cfg, rt = trainer.cfg, trainer.runtime
    dims, mbs = rt.dims, cfg.training.micro_batch_size
    m = cfg.training.global_batch_size // (mbs * dims.dp)
    total = dataset.num_pairs
    out = torch.zeros(total, 2, dtype=torch.float32, device=rt.device)  # [pairs, 2]
    per_batch = mbs * m * dims.dp
    trainer.model.eval()
    for start in range(0, total, per_batch):
        ids = [
            [(start + (j * dims.dp + dims.local.dp) * mbs + k) for k in range(mbs)] for j in range(m)
        ]  # [m][mbs] pair ids of this rank, maybe past the end
        batches = [_microbatch(dataset, [i % total for i in row], cfg, eod, rt.device) for row in ids]
        _score(trainer, batches, ids, out)
    trainer.model.train()
    if rt.distributed and dims.pp > 1:
        from megatron_lite.parallel import comm

        comm.all_reduce(out, dims.group("pp"))
    return rt.all_reduce_dp(out).cpu().numpy()


def attach_reference_logps(trainer, datasets: list, eod: int, resumed: bool, say) -> None:
    """Load the sidecar (or compute and write it at a fresh start) and hand it to ``datasets``.

    Raises:
        DatasetError: a resumed run finds no sidecar (its weights are no longer the reference).
    """
    cfg, rt = trainer.cfg, trainer.runtime
    live = [d for d in datasets if d is not None]
    prefix, seq = live[0].prefix, cfg.data.seq_length
    logps = load_ref_logps(prefix, live[0].num_pairs, seq)
    if logps is None:
        if resumed:
            raise DatasetError(
                f"{ref_logps_path(prefix)} is missing and the run resumes: the reference log-probs must "
                "come from the starting weights (restore the file or restart from training.initial_load)"
            )
        say(f" > dpo: scoring {live[0].num_pairs} pairs with the reference (starting) weights")
        logps = compute_reference_logps(trainer, live[0], eod)
        if rt.rank == 0:
            save_ref_logps(prefix, logps, seq)
        rt.barrier()
        say(f" > dpo: reference log-probs written to {ref_logps_path(prefix)}")
    else:
        say(f" > dpo: reference log-probs from {ref_logps_path(prefix)}")
    for d in live:
        d.ref_logps = logps
