"""Flax NNX blocks: standalone modules built from keyword arguments (``d_model`` and ``rngs``
suffice), called as ``y = block(x, segment_ids=None)`` or, decoding, ``y, cache = block(x,
cache=cache)`` with ``cache = block.init_cache(batch_size, max_length)``. See
:mod:`memjax.nn.block` for the contract. Importing the package registers every block under its
pattern name (``memjax.nn.registry``)."""
from memjax.nn.associative import DeltaNet, GatedDeltaNet, GatedLinearAttention, LinearAttention
from memjax.nn.delta_product import GatedDeltaProduct
from memjax.nn.attention import Attention
from memjax.nn.base_conv import BaseConv, BaseConvCache
from memjax.nn.fox import ForgettingAttention
from memjax.nn.block import Block
from memjax.nn.cache import KVCache, NoCache
from memjax.nn.episodic import EpisodicAttention, EpisodicCache
from memjax.nn.hierarchical_memory import HierarchicalMemoryFFN
from memjax.nn.host_params import HostIndex, HostParam
from memjax.nn.hopfield import HopfieldLayer as Hopfield
from memjax.nn.hybrid import SlidingWindowSSM
from memjax.nn.kda import GatedDeltaNet2, KimiDeltaAttention
from memjax.nn.layers import Linear, RMSNorm, ShortConv
from memjax.nn.log_linear import LogLinearGatedDeltaNet, LogLinearMamba2, LogLinearMamba2Cache
from memjax.nn.mamba1 import Mamba1
from memjax.nn.mamba3 import Mamba3, Mamba3Cache
from memjax.nn.memory_layers import MemoryPlusLayer as MemoryPlus
from memjax.nn.memory_layers import PKMLayer as ProductKeyMemory
from memjax.nn.mixture import MixtureOfMemories
from memjax.nn.miras import Memora, MirasCache, Moneta, Yaad
from memjax.nn.mlstm import MLSTM
from memjax.nn.move import MoVEAttention
from memjax.nn.mlp import GatedMLP
from memjax.nn.ngram import STEMFFN as STEM
from memjax.nn.ngram import NgramMemory
from memjax.nn.pararnn import ParaGRU, ParaLSTM, ParaRNNBlock
from memjax.nn.registry import get_block, known_names, register_block
from memjax.nn.rglru_block import RGLRUBlock as RGLRU
from memjax.nn.rwkv7 import RWKV7
from memjax.nn.ssm_blocks import S4D, Mamba2
from memjax.nn.titans import NeuralMemory, TitansMAG, TitansMAL
from memjax.nn.titans_mac import TitansMAC
from memjax.nn.vector_gated import HGRN2, RWKV6, GatedLinearAttentionVec

__all__ = [
    "Attention", "BaseConv", "BaseConvCache", "Block", "DeltaNet", "EpisodicAttention", "EpisodicCache",
    "ForgettingAttention",
    "GatedDeltaNet", "GatedDeltaNet2", "GatedDeltaProduct", "GatedLinearAttention",
    "GatedLinearAttentionVec", "GatedMLP", "HGRN2", "HierarchicalMemoryFFN", "Hopfield", "HostIndex",
    "HostParam", "KimiDeltaAttention", "KVCache", "Linear",
    "LinearAttention", "LogLinearGatedDeltaNet", "LogLinearMamba2", "LogLinearMamba2Cache", "Mamba1",
    "Mamba2", "Mamba3", "Mamba3Cache", "Memora", "MemoryPlus", "MirasCache", "MixtureOfMemories", "Moneta",
    "MoVEAttention", "MLSTM", "NeuralMemory", "NgramMemory", "NoCache", "ParaGRU", "ParaLSTM",
    "ParaRNNBlock", "ProductKeyMemory", "RGLRU", "RMSNorm", "RWKV6", "RWKV7", "S4D", "ShortConv",
    "SlidingWindowSSM", "STEM", "TitansMAC", "TitansMAG", "TitansMAL", "Yaad", "get_block", "known_names",
    "register_block",
]
