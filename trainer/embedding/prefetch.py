"""A software prefetch for numba kernels (LLVM's llvm.prefetch: read, keep in all caches).

The table's per-key work is bound by cache misses, not arithmetic: rows, optimizer state,
bookkeeping and index buckets of ~1000 random keys per table and step live in tens of MB.
A loop whose iterations each chase a miss and then branch on it keeps only a few misses in
flight. The kernels pipeline instead: while working on key i they request the lines of key
i + AHEAD, so about AHEAD keys' misses overlap. A first pass requesting the lines of every
key of the batch before any work (what the kernels did before) was half as fast on this
machine's 512 kB L2: a table's batch needs ~300 kB of lines, so the first ones were evicted
again before use, and the long burst of requests stalled on the miss buffers.
"""

from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

# Keys ahead of the work whose lines are requested (each key needs ~4 lines; 8 and 32 were
# no better here). numba bakes it into the cached kernels of the modules importing it, and
# only their own source changing invalidates that cache: clear their __pycache__ after
# changing it.
AHEAD = 16


def _emit(context, builder, aryty, array, indices) -> None:
    ary = context.make_array(aryty)(context, builder, array)
    ptr = cgutils.get_item_pointer(context, builder, aryty, ary, indices, wraparound=False)
    i8p, i32 = ir.IntType(8).as_pointer(), ir.IntType(32)
    fnty = ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32])
    fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.prefetch.p0")
    builder.call(fn, [builder.bitcast(ptr, i8p), i32(0), i32(3), i32(1)])


@intrinsic
def prefetch(typingctx, array, i):
    """Requests the cache line of array[i] (1-d) or of array[i, 0] (2-d: a row's start).
    i must be in range (no bounds check: that is the caller's)."""
    if not isinstance(array, types.Array) or not isinstance(i, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        aryty, ity = signature.args
        index = context.cast(builder, args[1], ity, types.intp)
        indices = [index] + [context.get_constant(types.intp, 0)] * (aryty.ndim - 1)
        _emit(context, builder, aryty, args[0], indices)
        return context.get_dummy_value()

    return types.void(array, i), codegen


@intrinsic
def prefetch_end(typingctx, array, i):
    """Requests the line of the last element of row i of a 2-d array: with prefetch, a
    whole row even when it straddles two lines (numpy aligns arrays to 16 bytes, not 64).
    On a 1-d array, the line of array[i]."""
    if not isinstance(array, types.Array) or array.ndim > 2 or not isinstance(i, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        aryty, ity = signature.args
        indices = [context.cast(builder, args[1], ity, types.intp)]
        if aryty.ndim == 2:
            ary = context.make_array(aryty)(context, builder, args[0])
            indices.append(builder.sub(cgutils.unpack_tuple(builder, ary.shape, 2)[1],
                                       context.get_constant(types.intp, 1)))
        _emit(context, builder, aryty, args[0], indices)
        return context.get_dummy_value()

    return types.void(array, i), codegen
