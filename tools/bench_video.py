#!/usr/bin/env python
"""Benchmark ``data_pipelines.video_reader.load_video`` against keye-vl-utils' ``fetch_video``.

Generates 720p and 1080p clips (cached in ``--workdir``), runs each reader in a fresh subprocess (so peak RSS is
per run), checks that indices, timestamps, frame types and slow/fast sizes are identical, and prints seconds per
video, the speed ratio and peak RSS. Both return the sampled frames at decoded size (ours holds them smaller only
past ``VideoOptions.full_size_limit_mb``) and leave the resize to slow/fast sizes to the processor; ``ours+px``
adds our ``clip_pixels`` (that resize, uint8) for reference. ``--long`` adds a 10-minute 1080p clip read by ours
only (the original keeps every sampled frame at full resolution, several GB there).

``--real DIR`` compares the two on every video in DIR instead (real footage: its encoder settings, GOP structure
and motion are what training data looks like): each reader runs in its own warm process that reads the clips one
after another, the two alternate ``--repeat`` times, and per clip the medians are compared; identical means
equal frame count, timestamps (as prompt text), frame types, slow/fast sizes and every frame's pixels (SHA-1).
It prints the ratio's median, geometric mean and worst clip, and exits non-zero if any clip differs. Beside each
reader's seconds it prints its CPU seconds (all threads), and ``ceiling``: the ratio ours would reach if its CPU
work were spread perfectly over every core (reference seconds over ours' CPU seconds per core): no scheduling
change can beat it, only less work per read.

    python tools/bench_video.py [--workdir /tmp/keye_bench] [--seconds 30] [--repeat 5] [--long]
    python tools/bench_video.py --real ../shared/data/real_videos [--repeat 5]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time


def _worker(impl: str, path: str, warmup: str) -> None:
    """Read ``warmup`` (a 2-second clip of the same resolution: library, decoder and allocator start-up, paid once
    per data-loader worker), then time one read of ``path`` and print a JSON result line (in its own process)."""
    from keye_vl_utils import fetch_video

    from data_pipelines.media import timestamp_text
    from data_pipelines.video_reader import clip_pixels, load_video

    t0 = time.perf_counter()
    fetch_video({"video": warmup}) if impl == "ref" else load_video(warmup)
    first_seconds = time.perf_counter() - t0
    base_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # after imports (torch alone is large)
    t0 = time.perf_counter()
    if impl == "ref":
        frames, kw = fetch_video({"video": path})
        out = {
            "frames": int(frames.shape[0]),
            "timestamps": [format(t, ".1f") for t in kw["timestamps"]],  # the released processor's prompt text
            "frame_types": [int(t) for t in kw["frame_types"]],
            "slow_hw": [kw["height"], kw["width"]],
            "fast_hw": [kw["fast_height"], kw["fast_width"]],
        }
    else:
        clip = load_video(path)
        t1 = time.perf_counter()
        clip_pixels(clip)
        pixels_seconds = time.perf_counter() - t1
        out = {
            "frames": clip.num_frames,
            "timestamps": [timestamp_text(t) for t in clip.timestamps],
            "frame_types": clip.frame_types,
            "slow_hw": list(clip.slow_hw),
            "fast_hw": list(clip.fast_hw),
        }
    out["seconds"] = time.perf_counter() - t0
    if impl != "ref":
        out["seconds"] -= pixels_seconds
        out["pixels_seconds"] = pixels_seconds
    out["warmup_seconds"] = first_seconds
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out["base_rss_mb"] = base_mb
    print(json.dumps(out))


VIDEO_SUFFIXES = (".mp4", ".mkv", ".webm", ".mov", ".avi")


def _read_real(impl: str, path: str) -> dict:
    """One timed read of ``path`` with everything the identity check needs (pixels hashed after the clock)."""
    from keye_vl_utils import fetch_video

    from data_pipelines.media import timestamp_text
    from data_pipelines.video_reader import load_video

    t0, c0 = time.perf_counter(), time.process_time()
    if impl == "ref":
        frames, kw = fetch_video({"video": path})
        seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
        out = {
            "timestamps": [format(t, ".1f") for t in kw["timestamps"]],
            "frame_types": [int(t) for t in kw["frame_types"]],
            "slow_hw": [kw["height"], kw["width"]],
            "fast_hw": [kw["fast_height"], kw["fast_width"]],
        }
    else:
        clip = load_video(path)
        seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
        frames = clip.frames
        out = {
            "timestamps": [timestamp_text(t) for t in clip.timestamps],
            "frame_types": clip.frame_types,
            "slow_hw": list(clip.slow_hw),
            "fast_hw": list(clip.fast_hw),
        }
    out["frames"] = int(frames.shape[0])
    out["shape"] = list(frames.shape)
    out["sha1"] = hashlib.sha1(frames.contiguous().numpy().tobytes()).hexdigest()
    out["seconds"] = seconds
    out["cpu"] = cpu
    return out


def _real_worker(impl: str, paths: list[str]) -> None:
    """Read the first clip once untimed (library, decoder and allocator start-up), then every clip once, timed,
    printing one JSON line each (in its own warm process)."""
    _read_real(impl, paths[0])
    for path in paths:
        print(json.dumps({"path": path, **_read_real(impl, path)}), flush=True)


def _real(folder: str, repeat: int) -> int:
    paths = sorted(os.path.join(folder, n) for n in os.listdir(folder) if n.lower().endswith(VIDEO_SUFFIXES))
    if not paths:
        print(f"no videos ({', '.join(VIDEO_SUFFIXES)}) in {folder}", file=sys.stderr)
        return 2
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    runs: dict[str, dict[str, list[dict]]] = {"ref": {}, "ours": {}}
    for _ in range(repeat):  # alternate so background load hits both alike
        for impl in ("ref", "ours"):
            proc = subprocess.run(
                [sys.executable, __file__, "--real-worker", impl, *paths],
                capture_output=True,
                text=True,
                env=env,
                check=False,
            )
            if proc.returncode != 0:
                raise RuntimeError(f"{impl} failed: {proc.stderr.strip().splitlines()[-1:]}")
            for line in proc.stdout.splitlines():
                if line.startswith("{"):
                    r = json.loads(line)
                    runs[impl].setdefault(r["path"], []).append(r)
    print(f"cpu cores: {os.cpu_count()}, repeats: {repeat} (median per clip), real clips from {folder}")
    print(
        f"{'clip':24} {'frames':>6} {'ref s':>7} {'ref cpu':>7} {'ours s':>7} {'ours cpu':>8} {'ratio':>6} "
        f"{'ceiling':>7}  identical"
    )
    keys = ("frames", "shape", "timestamps", "frame_types", "slow_hw", "fast_hw", "sha1")
    cores = len(os.sched_getaffinity(0))
    ratios, ceilings, identical = [], [], 0
    for path in paths:
        ref, ours = runs["ref"][path], runs["ours"][path]
        same = _same(runs, path, keys)
        identical += same
        ref_s = statistics.median(r["seconds"] for r in ref)
        our_s = statistics.median(r["seconds"] for r in ours)
        ref_cpu = statistics.median(r["cpu"] for r in ref)
        our_cpu = statistics.median(r["cpu"] for r in ours)
        ratios.append(ref_s / our_s)
        ceilings.append(ref_s / (our_cpu / cores))
        name = os.path.basename(path)
        print(
            f"{name:24} {ours[0]['frames']:6d} {ref_s:7.3f} {ref_cpu:7.3f} {our_s:7.3f} {our_cpu:8.3f} "
            f"{ratios[-1]:5.2f}x {ceilings[-1]:6.2f}x  {same}",
            flush=True,
        )
    geo = math.exp(sum(math.log(r) for r in ratios) / len(ratios))
    worst = min(range(len(ratios)), key=ratios.__getitem__)
    print(
        f"speed-up over keye-vl-utils on {len(ratios)} real clips: median {statistics.median(ratios):.2f}x, "
        f"geometric mean {geo:.2f}x, worst {ratios[worst]:.2f}x ({os.path.basename(paths[worst])}); "
        f"identical on {identical} of {len(ratios)}; ceiling at perfect use of {cores} cores: median "
        f"{statistics.median(ceilings):.2f}x"
    )
    return 0 if identical == len(paths) else 1


def _same(runs: dict, path: str, keys: tuple[str, ...]) -> bool:
    return all(runs["ref"][path][0][k] == runs["ours"][path][0][k] for k in keys)


def _run(impl: str, path: str, warmup: str) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.run(
        [sys.executable, __file__, "--worker", impl, path, warmup], capture_output=True, text=True, env=env, check=False
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{impl} on {path} failed: {proc.stderr.strip().splitlines()[-1:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _rss(runs: list[dict]) -> str:
    peak = max(r["peak_rss_mb"] for r in runs)
    extra = max(r["peak_rss_mb"] - r["base_rss_mb"] for r in runs)
    return f"{peak:.0f} (+{extra:.0f})"


def _make(workdir: str, name: str, seconds: float, fps: float, height: int, width: int) -> str:
    from data_pipelines import synthetic

    path = os.path.join(workdir, f"{name}.mp4")
    if not os.path.exists(path):
        t0 = time.perf_counter()
        synthetic.scene_cuts(
            path,
            every=int(fps * 7),
            num_frames=int(seconds * fps),
            fps=fps,
            height=height,
            width=width,
            preset="veryfast",
        )
        print(f"generated {path} in {time.perf_counter() - t0:.1f} s", flush=True)
    return path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="/tmp/keye_bench")
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--fps", type=float, default=30.0)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--long", action="store_true", help="also read a 10-minute 1080p clip (ours only)")
    parser.add_argument("--real", metavar="DIR", help="compare on the real videos in DIR instead of generated clips")
    parser.add_argument("--worker", nargs=3, metavar=("IMPL", "PATH", "WARMUP"), help=argparse.SUPPRESS)
    parser.add_argument("--real-worker", nargs="+", metavar="ARG", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        _worker(args.worker[0], args.worker[1], args.worker[2])
        return 0
    if args.real_worker:
        _real_worker(args.real_worker[0], args.real_worker[1:])
        return 0
    if args.real:
        return _real(args.real, args.repeat)
    os.makedirs(args.workdir, exist_ok=True)
    cases = []
    for label, (height, width) in (("720p", (720, 1280)), ("1080p", (1080, 1920))):
        path = _make(args.workdir, f"bench_{label}_{int(args.seconds)}s", args.seconds, args.fps, height, width)
        warmup = _make(args.workdir, f"bench_{label}_warmup_2s", 2.0, args.fps, height, width)
        cases.append((label, path, warmup))
    print(f"cpu cores: {os.cpu_count()}, repeats: {args.repeat} (median)")
    print("peak RSS in MB; +N is above the RSS right after imports")
    print(
        f"{'video':8} {'ref s':>8} {'ours s':>8} {'ratio':>6} {'ours+px':>8} {'ref RSS':>14} {'ours RSS':>14}  identical"
    )
    failed = False
    for label, path, warmup in cases:
        runs: dict[str, list[dict]] = {"ref": [], "ours": []}
        for _ in range(args.repeat):  # alternate so background load hits both alike
            for impl in ("ref", "ours"):
                runs[impl].append(_run(impl, path, warmup))
        keys = ("frames", "timestamps", "frame_types", "slow_hw", "fast_hw")
        same = all(runs["ref"][0][k] == runs["ours"][0][k] for k in keys)
        failed |= not same
        ref_s = statistics.median(r["seconds"] for r in runs["ref"])
        our_s = statistics.median(r["seconds"] for r in runs["ours"])
        our_px = statistics.median(r["seconds"] + r["pixels_seconds"] for r in runs["ours"])
        ref_mb, our_mb = _rss(runs["ref"]), _rss(runs["ours"])
        print(
            f"{label:8} {ref_s:8.2f} {our_s:8.2f} {ref_s / our_s:5.1f}x {our_px:8.2f} {ref_mb:>14} {our_mb:>14}  {same}",
            flush=True,
        )
    if args.long:
        from data_pipelines.media import size_text

        path = _make(args.workdir, "bench_1080p_600s", 600, 5.0, 1080, 1920)
        r = _run("ours", path, cases[-1][2])
        print(
            f"10-min 1080p @5fps (ours only): {r['seconds']:.2f} s, {r['frames']} frames "
            f"({sum(r['frame_types'])} fast), slow {size_text(r['slow_hw'])}, fast {size_text(r['fast_hw'])}, "
            f"peak RSS {_rss([r])} MB"
        )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
