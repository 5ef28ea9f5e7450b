"""The public names of design.md resolve to callables."""
import memjax
import memjax.memory as mm


def test_public_api():
    for name in ["linear_attention", "delta_rule", "delta_product", "titans", "mixture_of_memories", "hopfield_retrieval",
                 "rglru", "selective_scan", "diagonal_ssm", "causal_attention"]:
        assert callable(getattr(mm, name)), name
    for fn in [mm.hippo.legs, mm.hippo.legt, mm.hippo.lagt, mm.hippo.fout, mm.hippo.discretize,
               mm.ssm.selective_scan, mm.ssm.linear_scan, mm.product_keys.topk, memjax.kernels.embedding_bag, memjax.kernels.chunk_recurrence,
               mm.sequence_parallel.sharded_chunk_recurrence, mm.sequence_parallel.sharded_linear_scan]:
        assert callable(fn)
    from memjax.model import LM, generate  # noqa: F401
    from memjax.train import train_and_evaluate  # noqa: F401
