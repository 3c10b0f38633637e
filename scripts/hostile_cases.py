#!/usr/bin/env python3
"""Runs a `fips` binary on the hostile inputs of issue 13 and prints a table: exit status, peak
memory, wall time, what happened to the files, and the last line of the error.

    python3 scripts/hostile_cases.py --fips target/release/fips --data ../shared/data --work /tmp/hostile

Run it once with an old binary and once with a new one to get "before" and "after". Every case runs
under `ulimit -v` (8 GiB by default) and a time limit, so an unbounded allocation shows as an abort
instead of exhausting the machine. Only the Python standard library is used; the crafted files
(headers rewritten, a 1 x 30000 JPEG written by hand, truncated JPEGs) are made here, from the real
DeiT-tiny checkpoint and ImageNet sample.
"""

import argparse
import hashlib
import json
import os
import shutil
import struct
import subprocess
import sys
import time

ARGS = None


def sha(path):
    if not os.path.exists(path):
        return "absent"
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:12]


def run(cmd, timeout=180, shell_prefix=""):
    """Runs cmd (a list) under ulimit -v and /usr/bin/time; returns (rc, peak MB, seconds, stderr tail, stdout)."""
    kb = ARGS.vmem_gb * 1024 * 1024
    quoted = " ".join("'" + c.replace("'", "'\\''") + "'" for c in cmd)
    # With a prefix the command must keep the shell's pid ($$), so it runs without /usr/bin/time.
    timer = "" if shell_prefix else "/usr/bin/time -f 'MAXRSS %M' "
    script = f"ulimit -v {kb}; {shell_prefix}exec {timer}{quoted}"
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1")
    start = time.time()
    try:
        p = subprocess.run(["sh", "-c", script], capture_output=True, text=True, timeout=timeout, env=env)
        rc, out, err = p.returncode, p.stdout, p.stderr
    except subprocess.TimeoutExpired as e:
        rc, out, err = "timeout", (e.stdout or b"").decode(errors="replace"), (e.stderr or b"").decode(errors="replace")
    wall = time.time() - start
    rss = None
    lines = []
    for line in err.splitlines():
        if line.startswith("MAXRSS "):
            rss = int(line.split()[1]) // 1024
        elif line.strip() and not line.startswith("Command "):
            lines.append(line.strip())
    if isinstance(rc, int) and rc != 0 and "signal" in err:
        pass
    tail = lines[-1] if lines else ""
    for l in lines:
        if "memory allocation" in l or "panicked" in l or "capacity overflow" in l:
            tail = l
            break
    return rc, rss, wall, tail[:160], out


# --- safetensors helpers ---------------------------------------------------------------------

def read_st(path):
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
        data = f.read()
    return header, data


def write_st(path, header, data):
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        f.write(data)


def rebuild(header, tensors, metadata=None):
    """tensors: list of (name, dtype, shape, bytes) -> (header, data)."""
    h = {}
    if metadata is not None:
        h["__metadata__"] = metadata
    data = bytearray()
    for name, dtype, shape, raw in tensors:
        h[name] = {"dtype": dtype, "shape": shape, "data_offsets": [len(data), len(data) + len(raw)]}
        data += raw
    return h, bytes(data)


def tensors_of(header, data):
    out = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        a, b = info["data_offsets"]
        out.append((name, info["dtype"], info["shape"], data[a:b]))
    out.sort(key=lambda t: header[t[0]]["data_offsets"][0])
    return out


# --- JPEG helpers ----------------------------------------------------------------------------

def grey_jpeg(width, height):
    """A baseline greyscale JPEG of uniform grey, written by hand: every 8 x 8 block codes DC
    difference 0 and end-of-block, with one-symbol Huffman tables (2 bits per block)."""
    seg = lambda marker, body: b"\xff" + bytes([marker]) + struct.pack(">H", len(body) + 2) + body
    out = b"\xff\xd8"
    out += seg(0xDB, b"\x00" + bytes([1] * 64))  # quantisation table 0, all ones
    out += seg(0xC0, b"\x08" + struct.pack(">HH", height, width) + b"\x01" + b"\x01\x11\x00")
    counts = bytes([1] + [0] * 15)
    out += seg(0xC4, b"\x00" + counts + b"\x00")  # DC table 0: category 0 -> code '0'
    out += seg(0xC4, b"\x10" + counts + b"\x00")  # AC table 0: EOB -> code '0'
    out += seg(0xDA, b"\x01\x01\x00\x00\x3f\x00")
    blocks = ((width + 7) // 8) * ((height + 7) // 8)
    bits = 2 * blocks
    data = bytearray(bits // 8)
    rest = bits % 8
    if rest:
        data.append((1 << (8 - rest)) - 1)  # pad with one bits
    return out + bytes(data) + b"\xff\xd9"


def image_set(root, files):
    """An image set with one calib image per (name, bytes)."""
    os.makedirs(os.path.join(root, "calib"), exist_ok=True)
    with open(os.path.join(root, "labels.tsv"), "w") as f:
        f.write("file\tlabel\tsynset\tsplit\n")
        for name, raw in files:
            with open(os.path.join(root, "calib", name), "wb") as g:
                g.write(raw)
            f.write(f"calib/{name}\t1\tn0\tcalib\n")
            f.write(f"calib/{name}\t1\tn0\teval\n")


# --- the cases -------------------------------------------------------------------------------

def main():
    global ARGS
    ap = argparse.ArgumentParser()
    ap.add_argument("--fips", required=True)
    ap.add_argument("--data", default="../shared/data")
    ap.add_argument("--work", default="/tmp/fips-hostile")
    ap.add_argument("--vmem-gb", type=int, default=8)
    ap.add_argument("--only", default="")
    ARGS = ap.parse_args()
    fips = os.path.abspath(ARGS.fips)
    data = os.path.abspath(ARGS.data)
    w = os.path.abspath(ARGS.work)
    shutil.rmtree(w, ignore_errors=True)
    os.makedirs(w)
    model = os.path.join(data, "deit-tiny", "model.safetensors")
    images = os.path.join(data, "imagenet-sample")
    rows = []

    def row(case, res, effect):
        rc, rss, wall, tail, _ = res
        rows.append((case, str(rc), f"{rss} MB" if rss is not None else "?", f"{wall:.1f}s", effect, tail))
        print(f"{case}: rc={rc} rss={rss}MB wall={wall:.1f}s | {effect} | {tail}", file=sys.stderr)

    def want(name):
        return not ARGS.only or any(k in name for k in ARGS.only.split(","))

    quick = ["--data-free", "--data-free-tokens", "256", "--method", "svd", "--no-eval"]
    # A compressed file to work with (svd, blocks 0-1).
    base = os.path.join(w, "base")
    rc = run([fips, "compress", "--checkpoint", model, *quick, "--groups", "0-1", "--out-dir", base])
    compressed = os.path.join(base, "compressed.safetensors")
    if not os.path.exists(compressed):
        print("cannot make the base compressed file:", rc, file=sys.stderr)
        return 1

    if want("densify_out_is_original"):
        m = os.path.join(w, "a.safetensors")
        shutil.copy(model, m)
        before = sha(m)
        r = run([fips, "densify", "--compressed", compressed, "--original", m, "--out", m])
        row("densify --out = --original", r, "input " + ("unchanged" if sha(m) == before else "OVERWRITTEN"))

    if want("densify_out_is_compressed"):
        c = os.path.join(w, "c.safetensors")
        shutil.copy(compressed, c)
        before = sha(c)
        r = run([fips, "densify", "--compressed", c, "--original", model, "--out", c])
        row("densify --out = --compressed", r, "input " + ("unchanged" if sha(c) == before else "OVERWRITTEN"))

    if want("densify_out_hard_link"):
        m = os.path.join(w, "h.safetensors")
        shutil.copy(model, m)
        os.link(m, os.path.join(w, "h-link.safetensors"))
        before = sha(m)
        r = run([fips, "densify", "--compressed", compressed, "--original", m, "--out", os.path.join(w, "h-link.safetensors")])
        # rename replaces the link name, so the original inode survives either way; report it.
        row("densify --out = hard link of --original", r, "input " + ("unchanged" if sha(m) == before else "OVERWRITTEN"))

    if want("capture_out_is_checkpoint"):
        m = os.path.join(w, "cap.safetensors")
        shutil.copy(model, m)
        size = os.path.getsize(m)
        r = run([fips, "capture", "--checkpoint", m, "--images", images, "--calib-images", "2", "--out", m])
        row("capture --out = --checkpoint", r, f"input {size} -> {os.path.getsize(m)} bytes")

    if want("compress_checkpoint_in_out_dir"):
        d = os.path.join(w, "outdir")
        os.makedirs(d)
        m = os.path.join(d, "densified.safetensors")
        shutil.copy(model, m)
        before = sha(m)
        r = run([fips, "compress", "--checkpoint", m, *quick, "--groups", "0-1", "--out-dir", d])
        row("compress: checkpoint = out-dir/densified.safetensors", r, "input " + ("unchanged" if sha(m) == before else "OVERWRITTEN"))

    if want("planted_symlink"):
        d = os.path.join(w, "planted")
        os.makedirs(d)
        victim = os.path.join(d, "victim.txt")
        with open(victim, "w") as f:
            f.write("precious\n")
        out = os.path.join(d, "x.safetensors")
        prefix = f"ln -s {victim} {d}/.x.safetensors.$$.tmp; "
        r = run([fips, "densify", "--compressed", compressed, "--original", model, "--out", out], shell_prefix=prefix)
        with open(victim, "rb") as f:
            ok = f.read() == b"precious\n"
        row("symlink planted at the temp name", r, "link target " + ("intact" if ok else "WRITTEN THROUGH"))

    if want("symlink_destination"):
        d = os.path.join(w, "linkdest")
        os.makedirs(d)
        victim = os.path.join(d, "victim.txt")
        with open(victim, "w") as f:
            f.write("precious\n")
        out = os.path.join(d, "x.safetensors")
        os.symlink(victim, out)
        r = run([fips, "densify", "--compressed", compressed, "--original", model, "--out", out])
        with open(victim, "rb") as f:
            ok = f.read() == b"precious\n"
        row("--out is a symlink to another file", r, ("link target intact" if ok else "target WRITTEN") + (", link replaced by a file" if not os.path.islink(out) else ", link kept"))

    for spec in ["0-4000000000", "0-18446744073709551615"]:
        if want("groups"):
            r = run([fips, "compress", "--checkpoint", model, *quick, "--groups", spec, "--out-dir", os.path.join(w, "g")])
            row(f"--groups {spec}", r, "")

    for method in ["fips", "svd"]:
        if want("rank"):
            out = os.path.join(w, f"rank-{method}")
            extra = ["--steps", "2", "--batch-tokens", "256"] if method == "fips" else []
            r = run([fips, "compress", "--checkpoint", model, "--data-free", "--data-free-tokens", "1024", "--no-eval",
                     "--method", method, "--rank", "100000", "--groups", "0-3", *extra, "--out-dir", out], timeout=120)
            f = os.path.join(out, "compressed.safetensors")
            effect = f"compressed file {os.path.getsize(f) // 1024} KB" if os.path.exists(f) else "no output"
            row(f"--method {method} --rank 100000", r, effect)

    if want("data_free_tokens"):
        r = run([fips, "compress", "--checkpoint", model, "--data-free", "--data-free-tokens", "1000000000000", "--method", "svd",
                 "--no-eval", "--groups", "0", "--out-dir", os.path.join(w, "dft")], timeout=60)
        row("--data-free-tokens 10^12", r, "")

    if want("calib_images_0"):
        r = run([fips, "compress", "--checkpoint", model, "--images", images, "--calib-images", "0", "--method", "svd",
                 "--no-eval", "--out-dir", os.path.join(w, "ci0")])
        row("--calib-images 0", r, "")

    with open(os.path.join(images, "labels.tsv")) as f:
        first = f.read().splitlines()[1].split("\t")[0]
    with open(os.path.join(images, first), "rb") as f:
        real_jpeg = f.read()

    if want("truncated_jpeg"):
        d = os.path.join(w, "trunc")
        image_set(d, [("t.jpg", real_jpeg[: len(real_jpeg) * 6 // 10])])
        out = os.path.join(w, "trunc.safetensors")
        r = run([fips, "capture", "--checkpoint", model, "--images", d, "--blocks", "0", "--out", out])
        row("truncated JPEG (60% of a real one)", r, "accepted, output written" if os.path.exists(out) else "rejected")

    if want("wide_jpeg"):
        d = os.path.join(w, "wide")
        wide = grey_jpeg(1, 30000)
        image_set(d, [("w.jpg", wide)])
        out = os.path.join(w, "wide.safetensors")
        r = run([fips, "capture", "--checkpoint", model, "--images", d, "--blocks", "0", "--out", out])
        row(f"JPEG of 1 x 30000 pixels ({len(wide)} bytes)", r, "output written" if os.path.exists(out) else "no output")

    if want("patch1"):
        header, raw = read_st(model)
        ts = tensors_of(header, raw)
        width = 192
        tokens = 1 + 224 * 224
        new = []
        for name, dtype, shape, b in ts:
            if name == "patch_embed.proj.weight":
                shape, b = [width, 3, 1, 1], bytes(4 * width * 3)
            elif name == "pos_embed":
                shape, b = [1, tokens, width], bytes(4 * tokens * width)
            new.append((name, dtype, shape, b))
        h, dd = rebuild(header, new)
        p1 = os.path.join(w, "patch1.safetensors")
        write_st(p1, h, dd)
        d = os.path.join(w, "p1imgs")
        image_set(d, [("a.jpg", real_jpeg)])
        r = run([fips, "eval", "--checkpoint", p1, "--images", d, "--split", "eval"])
        row("checkpoint with patch size 1 (eval)", r, "")

    if want("empty_tensors"):
        n = 1_500_000
        path = os.path.join(w, "empty.safetensors")
        parts = ['"t%d":{"dtype":"F32","shape":[0],"data_offsets":[0,0]}' % i for i in range(n)]
        text = ("{" + ",".join(parts) + "}").encode()
        text += b" " * (-len(text) % 8)
        with open(path, "wb") as f:
            f.write(struct.pack("<Q", len(text)))
            f.write(text)
        r = run([fips, "inspect", path])
        row(f"header of {n} empty tensors ({len(text) // 1_000_000} MB)", r, "")

    if want("mlp_inputs_missing_block"):
        acts = os.path.join(w, "acts.safetensors")
        run([fips, "capture", "--checkpoint", model, "--images", images, "--calib-images", "4", "--out", acts])
        header, raw = read_st(acts)
        ts = [t for t in tensors_of(header, raw) if t[0] != "blocks.8.mlp_input"]
        h, dd = rebuild(header, ts, header.get("__metadata__"))
        write_st(acts, h, dd)
        r = run([fips, "compress", "--checkpoint", model, "--activations", acts, "--method", "fips", "--steps", "150",
                 "--batch-tokens", "256", "--no-eval", "--out-dir", os.path.join(w, "miss")], timeout=600)
        row("MLP-input file without block 8 (fips, 3 groups)", r, "error reported after %.0f s" % r[2])

    if want("manifest_other_block"):
        header, raw = read_st(compressed)
        manifest = json.loads(header["__metadata__"]["fips.manifest"])
        for m in manifest["groups"][0]["matrices"]:
            m["weight"] = m["weight"].replace("blocks.0.", "blocks.5.")
            if m["bias"]:
                m["bias"] = m["bias"].replace("blocks.0.", "blocks.5.")
        header["__metadata__"]["fips.manifest"] = json.dumps(manifest)
        bad = os.path.join(w, "other-block.safetensors")
        write_st(bad, header, raw)
        out = os.path.join(w, "other-block-dense.safetensors")
        r = run([fips, "densify", "--compressed", bad, "--original", model, "--out", out])
        effect = "no output"
        if os.path.exists(out):
            hm, dm = read_st(model)
            ho, do = read_st(out)
            def t(h, d, n):
                a, b = h[n]["data_offsets"]
                return d[a:b]
            same = t(ho, do, "blocks.5.mlp.fc1.weight") == t(hm, dm, "blocks.5.mlp.fc1.weight")
            effect = "block 5 " + ("unchanged" if same else "REPLACED by block 0's rebuild")
        row("manifest names point at block 5 (densify)", r, effect)

    fips_base = os.path.join(w, "fips-base")
    if want("manifest_intermediate"):
        run([fips, "compress", "--checkpoint", model, "--data-free", "--data-free-tokens", "512", "--method", "fips",
             "--steps", "2", "--batch-tokens", "256", "--no-eval", "--groups", "0-1", "--out-dir", fips_base])
    for value in [300000, 2 ** 40]:
        if want("manifest_intermediate"):
            header, raw = read_st(os.path.join(fips_base, "compressed.safetensors"))
            manifest = json.loads(header["__metadata__"]["fips.manifest"])
            manifest["groups"][0]["intermediate"] = value
            header["__metadata__"]["fips.manifest"] = json.dumps(manifest)
            bad = os.path.join(w, f"inter-{value}.safetensors")
            write_st(bad, header, raw)
            r = run([fips, "densify", "--compressed", bad, "--original", model, "--out", os.path.join(w, "inter-out.safetensors")])
            row(f"manifest intermediate = {value} (densify)", r, "")
            r = run([fips, "inspect", bad])
            row(f"manifest intermediate = {value} (inspect)", r, "")

    if want("determinism"):
        hashes = set()
        for i in range(6):
            out = os.path.join(w, "det-dense.safetensors")
            run([fips, "densify", "--compressed", compressed, "--original", model, "--out", out])
            hashes.add(sha(out))
        rows.append(("densify 6 times", "", "", "", f"{len(hashes)} distinct hashes", ""))
        hashes = set()
        for i in range(6):
            out = os.path.join(w, "det-cap.safetensors")
            run([fips, "capture", "--checkpoint", model, "--images", images, "--calib-images", "1", "--blocks", "0", "--out", out])
            hashes.add(sha(out))
        rows.append(("capture 6 times", "", "", "", f"{len(hashes)} distinct hashes", ""))

    print("| case | exit | peak RSS | wall | effect | message |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print("| " + " | ".join(c.replace("|", "/") for c in r) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
