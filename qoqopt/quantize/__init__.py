"""Weight quantization for the GPTQ and AWQ exports: pure math plus a layer-streaming runner.

* :mod:`.rtn` - shared primitives (:class:`QuantSpec`, :class:`QuantizedWeight`) and the RTN baseline;
* :mod:`.gptq` - Hessian accumulation and GPTQ with act-order / static groups;
* :mod:`.awq` - activation-aware scale search, GQA-aware folding helpers, clipping search;
* :mod:`.runner` - capture decoder-layer-0 inputs once, then quantize one layer at a time.

Nothing here knows a checkpoint format: :mod:`qoqopt.exports.hf_quant` packs and writes.
"""

from .awq import awq_quantize, search_clip, search_scale
from .gptq import accumulate_hessian, gptq_quantize
from .rtn import QuantizedWeight, QuantSpec, rtn_quantize

__all__ = [
    "QuantSpec",
    "QuantizedWeight",
    "accumulate_hessian",
    "awq_quantize",
    "gptq_quantize",
    "rtn_quantize",
    "search_clip",
    "search_scale",
]
