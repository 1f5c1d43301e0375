"""benchmarks/triton_ptx_check.py's SASS reading (the compile itself needs the triton package; not in CI): the
instructions per exp2 of the innermost exp loop and its tensor-core instructions, on a hand-written cuobjdump
listing."""

from __future__ import annotations

from benchmarks.triton_ptx_check import sass_stats


def _listing(ops: list[str]) -> str:
    """cuobjdump -sass lines: /*addr*/ opcode ; /* encoding */, 16 bytes an instruction."""
    return "\n".join(f"        /*{16 * i:04x}*/                   {op} ;   /* 0x000000 */" for i, op in enumerate(ops))


def test_the_leanest_innermost_exp_loop_counted_along_its_skipping_path():
    ops = ["MOV R1, R2"]                                                               # 0
    # loop A (1-9): 2 ex2, and a forward branch over 3 instructions (4-6) holding a third ex2
    ops += ["HGMMA.64x64x16.F32.BF16 R24, gdesc[UR4], RZ", "MUFU.EX2 R5, R3", "@!P0 BRA 0x70", "MUFU.EX2 R6, R6",
            "FMUL R7, R7, R6", "FADD R8, R8, R7", "MUFU.EX2 R9, R3", "FADD R8, R8, R9",  # 1-8
            "@P1 BRA 0x10"]                                                            # 9: back to 1
    # loop B (10-17): 2 ex2, more instructions: the same ex2 count, so A (the shorter path) is the one reported
    ops += ["HMMA.16816.F32.BF16 R4, R8, R12, R4", "MUFU.EX2 R5, R3", "FSEL R5, R5, RZ, P2", "MUFU.EX2 R9, R3",
            "FADD R8, R8, R9", "FADD R8, R8, R5", "ISETP.GE.AND P1, PT, R1, R2, PT", "@P1 BRA 0xa0"]  # 10-17
    # an outer loop around both (0-18) is not innermost
    ops += ["@P3 BRA 0x0", "EXIT"]
    stats = sass_stats("code for sm_90a\n" + _listing(ops))
    print(stats)
    # A along the path that takes its branch: 1, 2, 3, 7, 8, 9 -> 6 instructions, 2 ex2 (the skipped one left out)
    assert stats == {"sass_instrs": 20, "loop_instrs": 6, "loop_ex2": 2, "loop_hgmma": 1, "loop_hmma": 0}


def test_no_exp_loop():
    stats = sass_stats(_listing(["FMUL R3, R3, R4", "@P0 BRA 0x0", "MUFU.EX2 R1, R1", "EXIT"]))
    assert stats == {"sass_instrs": 4}
