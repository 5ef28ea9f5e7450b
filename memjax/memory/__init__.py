"""Pure-function memories (no Flax): ``memjax.memory.delta(q, k, v, beta, ...)`` etc.

Sequence memories return ``(output, final_state)``, accept ``initial_state`` and offer
``mode="chunked" | "recurrent"`` (and ``"parallel"`` where a quadratic form exists); ``contract``
holds their shared contract (signature, layout, dtypes, errors) and the checks that enforce it.
Modules with several entry points are exported as modules: ``hippo``, ``ssm``,
``product_keys``, ``ngram_memory``, ``feature_maps``, ``reparam``, ``sharded_lookup``,
``sequence_parallel`` (the state exchange behind every ``seq_axis=`` argument).
"""
from memjax.memory import (contract, feature_maps, hippo, ngram_memory, product_keys, reparam, sequence_parallel,
                           sharded_lookup, ssm)
from memjax.memory.attention import causal_attention, rope
from memjax.memory.delta import delta_rule
from memjax.memory.delta_product import delta_product
from memjax.memory.dplr import dplr_delta_rule
from memjax.memory.episodic import (EpisodicState, episodic_init, episodic_reset, episodic_retrieve, episodic_write,
                                    topk_attention)
from memjax.memory.flash_attention import flash_attention
from memjax.memory.gdn2 import gdn2
from memjax.memory.hierarchical_bank import memory_ffn, num_blocks, path_block_ids
from memjax.memory.hopfield import hopfield_energy, hopfield_retrieval
from memjax.memory.linear import linear_attention
from memjax.memory.log_linear import LogLinearState, log_linear_attention
from memjax.memory.log_linear_delta import log_linear_delta_rule
from memjax.memory.mamba1 import mamba1_scan
from memjax.memory.mamba3 import Mamba3State, mamba3
from memjax.memory.miras import PRESETS as MIRAS_PRESETS
from memjax.memory.miras import MirasSpec, miras
from memjax.memory.miras import preset as miras_preset
from memjax.memory.mixture import mixture_of_memories
from memjax.memory.mlstm import mlstm
from memjax.memory.pararnn import pararnn, pararnn_gru, pararnn_lstm
from memjax.memory.rg_lru import rglru
from memjax.memory.ring_attention import ring_attention
from memjax.memory.ssm import diagonal_ssm, selective_scan
from memjax.memory.neural_memory import titans

__all__ = [
    "EpisodicState", "LogLinearState", "MIRAS_PRESETS", "Mamba3State", "MirasSpec", "causal_attention",
    "contract", "delta_product", "delta_rule", "diagonal_ssm", "dplr_delta_rule", "episodic_init",
    "episodic_reset", "episodic_retrieve", "episodic_write", "feature_maps", "flash_attention", "gdn2",
    "hippo", "memory_ffn", "num_blocks", "path_block_ids", "hopfield_energy", "hopfield_retrieval", "linear_attention", "log_linear_attention",
    "log_linear_delta_rule", "mamba1_scan", "mamba3", "miras", "miras_preset", "mixture_of_memories",
    "mlstm", "ngram_memory", "pararnn", "pararnn_gru", "pararnn_lstm", "product_keys", "reparam", "rglru",
    "ring_attention", "rope", "selective_scan", "sequence_parallel", "sharded_lookup", "ssm", "titans",
    "topk_attention",
]
