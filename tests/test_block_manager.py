"""BlockManager: exact block ids, free order, ref counts, rows, invariants. Pure numpy, milliseconds."""

import ast
import pathlib

import numpy as np
import pytest

from jaxllm.core.block_manager import BlockManager


def make(num_blocks=8, block_size=4, max_num_seqs=3, max_blocks_per_seq=4):
    return BlockManager(num_blocks, block_size, max_num_seqs, max_blocks_per_seq)


def test_allocation_order_and_sink_never_handed_out():
    bm = make()
    assert bm.num_free_blocks == 7 and bm.num_used_blocks == 0 and bm.usage == 0.0
    assert bm.allocate_for("a", 5)  # 5 slots, block_size 4 -> 2 blocks
    assert bm.blocks_of("a") == [1, 2]
    assert bm.allocate_for("b", 1)
    assert bm.blocks_of("b") == [3]
    assert bm.allocate_for("a", 8)  # still 2 blocks: no-op
    assert bm.blocks_of("a") == [1, 2]
    assert bm.allocate_for("a", 9)  # grows by one, keeps the old ones
    assert bm.blocks_of("a") == [1, 2, 4]
    assert bm.num_free_blocks == 3 and bm.num_used_blocks == 4
    assert bm.usage == pytest.approx(4 / 7)
    bm.check_invariants()


def test_num_blocks_needed_and_can_allocate():
    bm = make()
    assert bm.num_blocks_needed("a", 0) == 0
    assert bm.num_blocks_needed("a", 1) == 1
    assert bm.num_blocks_needed("a", 4) == 1
    assert bm.num_blocks_needed("a", 5) == 2
    bm.allocate_for("a", 4)
    assert bm.num_blocks_needed("a", 4) == 0
    assert bm.num_blocks_needed("a", 5) == 1
    assert bm.num_blocks_needed("a", 2) == 0  # never negative
    assert bm.can_allocate(6) and not bm.can_allocate(7)


def test_allocate_fails_without_change():
    bm = make(num_blocks=4)  # 3 usable blocks
    assert bm.allocate_for("a", 8)  # blocks 1, 2
    table_before = bm.block_table.copy()
    assert not bm.allocate_for("b", 9)  # needs 3, 1 free
    assert bm.blocks_of("b") == [] and not bm.has_blocks("b")
    assert not bm.allocate_for("a", 16)  # needs 2 more, 1 free
    assert bm.blocks_of("a") == [1, 2]
    assert np.array_equal(bm.block_table, table_before)
    assert bm.num_free_blocks == 1
    with pytest.raises(KeyError):
        bm.row_of("b")
    bm.check_invariants()


def test_max_blocks_per_seq_limit():
    bm = make(num_blocks=10, max_blocks_per_seq=2)
    assert not bm.allocate_for("a", 9)  # 3 blocks > 2 per sequence
    assert bm.allocate_for("a", 8)
    assert not bm.allocate_for("a", 9)
    assert bm.blocks_of("a") == [1, 2]
    bm.check_invariants()


def test_free_order_reuse_fifo():
    bm = make()
    bm.allocate_for("a", 8)  # [1, 2]
    bm.allocate_for("b", 8)  # [3, 4]
    bm.free("a")  # free queue: 5 6 7 | 2 1   (tail block first)
    assert bm.num_free_blocks == 5
    bm.check_invariants()
    assert bm.allocate_for("c", 16)  # 4 blocks: the never-used ones first, then the freed tail-first
    assert bm.blocks_of("c") == [5, 6, 7, 2]
    assert bm.allocate_for("d", 1)
    assert bm.blocks_of("d") == [1]
    bm.free("unknown")  # no-op
    bm.check_invariants()


def test_rows_assigned_lowest_first_and_reused():
    bm = make()
    bm.allocate_for("a", 1)
    bm.allocate_for("b", 1)
    bm.allocate_for("c", 1)
    assert [bm.row_of(r) for r in "abc"] == [0, 1, 2]
    bm.free("b")
    assert not bm.block_table[1].any()
    bm.free("a")
    bm.allocate_for("d", 5)  # lowest free row is 0
    assert bm.row_of("d") == 0
    assert bm.block_table[0].tolist() == [4, 5, 0, 0]  # never-used blocks come before freed 2, 1
    bm.check_invariants()


def test_block_table_contents_exact():
    bm = make()
    bm.allocate_for("a", 5)
    bm.allocate_for("b", 4)
    bm.allocate_for("a", 13)
    assert bm.block_table.tolist() == [
        [1, 2, 4, 5],
        [3, 0, 0, 0],
        [0, 0, 0, 0],
    ]
    assert bm.block_table.dtype == np.int32 and bm.block_table.shape == (3, 4)


def test_ref_counts_and_fork_sharing():
    bm = make()
    bm.allocate_for("a", 8)  # [1, 2]
    bm.fork("a", "b")
    assert bm.blocks_of("b") == [1, 2]
    assert bm.ref_counts.tolist() == [0, 2, 2, 0, 0, 0, 0, 0]
    assert bm.ref_counts.dtype == np.int32
    assert bm.block_table[bm.row_of("b")].tolist() == [1, 2, 0, 0]
    bm.check_invariants()
    bm.allocate_for("b", 9)  # b grows privately
    assert bm.blocks_of("b") == [1, 2, 3]
    bm.free("a")  # shared blocks stay owned by b
    assert bm.num_free_blocks == 4 and bm.ref_counts.tolist()[:4] == [0, 1, 1, 1]
    bm.check_invariants()
    bm.free("b")
    assert bm.num_free_blocks == 7 and not bm.ref_counts.any()
    bm.check_invariants()


def test_exhaust_whole_pool_never_yields_block_zero():
    bm = make(num_blocks=6, block_size=1, max_num_seqs=5, max_blocks_per_seq=5)
    got = []
    for i in range(5):
        assert bm.allocate_for(f"r{i}", 1)
        got += bm.blocks_of(f"r{i}")
    assert sorted(got) == [1, 2, 3, 4, 5]
    assert not bm.allocate_for("r0", 2)
    assert bm.usage == 1.0
    bm.check_invariants()


def test_check_invariants_detects_corruption():
    bm = make()
    bm.allocate_for("a", 8)
    bm.ref_counts[1] = 2
    with pytest.raises(AssertionError, match="ref counts"):
        bm.check_invariants()
    bm.ref_counts[1] = 1
    bm._free.append(2)  # owned and free
    with pytest.raises(AssertionError, match="both free and owned"):
        bm.check_invariants()
    bm._free.pop()
    bm._free.popleft()  # leak block 3
    with pytest.raises(AssertionError, match="leaked"):
        bm.check_invariants()
    bm._free.appendleft(3)
    bm.check_invariants()
    bm.block_table[bm.row_of("a"), 3] = 7
    with pytest.raises(AssertionError, match="block_table row"):
        bm.check_invariants()
    bm.block_table[bm.row_of("a"), 3] = 0
    bm._free.append(0)
    with pytest.raises(AssertionError, match="sink"):
        bm.check_invariants()


def test_constructor_validation():
    with pytest.raises(ValueError, match="num_blocks"):
        BlockManager(1, 4, 2, 2)
    with pytest.raises(ValueError, match="block_size"):
        BlockManager(4, 0, 2, 2)


def test_core_never_imports_jax():
    # House rule 1: checked on the source, so it holds whatever jaxllm/__init__ imports.
    root = pathlib.Path(__file__).resolve().parents[1] / "jaxllm"
    for path in [root / "request.py", *sorted((root / "core").glob("*.py"))]:
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            for n in names:
                assert n.split(".")[0] != "jax", f"{path.name} imports {n}"
