"""What a benchmark ran on: CPU model, ISA extensions and cores parsed from /proc/cpuinfo text."""

from __future__ import annotations

import json

# Two blocks of an AVX2-only AMD box (Zen 3: no AVX-512, no VNNI, no AMX), 1 core with 2 threads.
ZEN3 = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC 7B13
physical id\t: 0
core id\t\t: 0
flags\t\t: fpu sse4_2 avx avx2 fma bmi2 vaes

processor\t: 1
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC 7B13
physical id\t: 0
core id\t\t: 0
flags\t\t: fpu sse4_2 avx avx2 fma bmi2 vaes
"""

# Sapphire Rapids: AVX-512 VNNI and AMX; "avx512_vnni" must not be mistaken for "avx_vnni" and vice versa.
SPR = """processor\t: 0
model name\t: Intel(R) Xeon(R) Platinum 8480+
physical id\t: 0
core id\t\t: 0
flags\t\t: avx avx2 avx512f avx512_vnni avx512_bf16 amx_bf16 amx_tile amx_int8

processor\t: 1
model name\t: Intel(R) Xeon(R) Platinum 8480+
physical id\t: 0
core id\t\t: 1
flags\t\t: avx avx2 avx512f avx512_vnni avx512_bf16 amx_bf16 amx_tile amx_int8
"""


def test_parse_cpuinfo_avx2_only_box():
    from damage.tasks.core.machine import parse_cpuinfo

    c = parse_cpuinfo(ZEN3)
    assert c["model"] == "AMD EPYC 7B13"
    assert c["isa"] == {"AVX2": True, "AVX-512F": False, "AVX512_VNNI": False, "AVX_VNNI": False,
                        "AVX512_BF16": False, "AMX_INT8": False, "AMX_BF16": False}
    assert c["logical_cpus"] == 2 and c["physical_cores"] == 1  # SMT siblings share a core id


def test_parse_cpuinfo_vnni_and_amx_told_apart():
    from damage.tasks.core.machine import parse_cpuinfo

    c = parse_cpuinfo(SPR)
    assert c["isa"]["AVX512_VNNI"] and not c["isa"]["AVX_VNNI"]
    assert c["isa"]["AMX_INT8"] and c["isa"]["AMX_BF16"] and c["isa"]["AVX-512F"]
    assert c["logical_cpus"] == 2 and c["physical_cores"] == 2
    arm = parse_cpuinfo("processor : 0\nFeatures : fp asimd\nModel : Raspberry Pi 5\n")
    assert arm["model"] == "Raspberry Pi 5" and not any(arm["isa"].values()) and arm["physical_cores"] is None


def test_machine_info_and_line_from_a_file(tmp_path):
    from damage.tasks.core.machine import machine_info, machine_line

    f = tmp_path / "cpuinfo"
    f.write_text(ZEN3)
    info = machine_info({"ort_intra_op": 2}, cpuinfo=f)
    json.dumps(info)  # goes into the benches' JSON output as is
    assert info["cpu"] == "AMD EPYC 7B13" and info["threads"]["ort_intra_op"] == 2
    assert info["runtimes"]["onnxruntime"]  # a declared dependency: always reported
    line = machine_line(info)
    assert "AMD EPYC 7B13" in line and "isa AVX2 (no AVX-512F" in line and "ort_intra_op=2" in line
    assert "onnxruntime " + info["runtimes"]["onnxruntime"] in line
    missing = machine_info(cpuinfo=tmp_path / "absent")
    assert not any(missing["isa"].values()) and missing["cpu"]
