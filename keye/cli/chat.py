"""``keye chat``: stream an answer about images or a video from a checkpoint."""

from __future__ import annotations

import argparse
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="checkpoint directory (keye init or a training export)")
    parser.add_argument("--image", action="append", default=[], help="image path (repeatable)")
    parser.add_argument("--video", help="video file, or a directory of frame images")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--think", dest="mode", action="store_const", const="think", help="thinking mode (/think)")
    mode.add_argument("--no-think", dest="mode", action="store_const", const="no_think", help="direct answer")
    parser.add_argument("--fps", type=float, help="video sampling rate (default 2.0)")
    parser.add_argument("--max-frames", type=int, help="cap on sampled frames")
    parser.add_argument("--no-slow-fast", action="store_true", help="treat every frame as slow")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--tools", action="store_true", help="Thyme tool use: run the model's <code> in the sandbox")
    parser.add_argument("--max-rounds", type=int, default=5, help="code rounds per answer with --tools")
    parser.add_argument("prompt", help="the question")


def build_conversation(prompt: str, images: list[str], video: str | None, video_opts: dict) -> list[dict]:
    from pathlib import Path

    content: list[dict] = [{"type": "image", "image": p} for p in images]
    if video:
        path = Path(video)
        if path.is_dir():
            frames = sorted(str(p) for p in path.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
            if not frames:
                raise FileNotFoundError(f"no frame images (.jpg/.png) in {path}")
            content.append({"type": "video", "video": frames, **video_opts})
        else:
            content.append({"type": "video", "video": str(path), **video_opts})
    content.append({"type": "text", "text": prompt})
    return [{"role": "user", "content": content}]


def run(args: argparse.Namespace) -> int:
    from keye.quiet import quiet

    quiet()  # third-party logs and progress bars (KEYE_VERBOSE=1 keeps them)
    from keye.inference import ChatEngine, GenerationSettings, TimedTextStreamer

    video_opts = {}
    if args.fps is not None:
        video_opts["fps"] = args.fps
    if args.max_frames is not None:
        video_opts["max_frames"] = args.max_frames
    if args.no_slow_fast:
        video_opts["slow_fast"] = False
    engine = ChatEngine.from_pretrained(args.model, device=args.device)
    if args.tools:
        return run_with_tools(args, engine)
    conversation = build_conversation(args.prompt, args.image, args.video, video_opts)
    sample = engine.encode([conversation], mode=args.mode)[0]
    visual = sample.num_visual_tokens
    print(f"[prompt: {len(sample)} tokens, {visual} visual]", file=sys.stderr)
    streamer = TimedTextStreamer(engine.processor.tokenizer, lambda t: print(t, end="", flush=True))
    settings = GenerationSettings(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p)
    result = engine.generate_encoded([sample], settings, streamer=streamer)
    print()
    ttft = f"{result.first_token_seconds:.2f}s" if result.first_token_seconds is not None else "n/a"
    n_new = len(result.token_ids[0])
    print(
        f"[visual tokens: {visual}; time to first token: {ttft}; {n_new} tokens in {result.seconds:.2f}s]",
        file=sys.stderr,
    )
    return 0


def run_with_tools(args: argparse.Namespace, engine) -> int:
    """One Thyme trajectory in the evaluation setup (greedy code, retries); prints each segment and round as it
    happens: model text on stdout as it is generated, sandbox output in ``<sandbox_output>`` between segments."""
    import tempfile

    from keye.thyme import ToolEvent, ToolLoop, ToolLoopConfig, thyme_conversation

    if args.video:
        raise ValueError("--tools works on --image inputs (the sandbox code opens image files), not --video")
    cfg = ToolLoopConfig.evaluation(
        max_new_tokens=args.max_new_tokens,
        max_rounds=args.max_rounds,
        text_temperature=args.temperature,
        top_p=args.top_p,
    )

    def show(event: ToolEvent) -> None:
        if event.kind == "segment":
            print(event.segment.text, end="", flush=True)
        elif event.kind == "round":
            r = event.round
            shown = "".join(f"<image {p}>" for p in r.images)
            print(f"<sandbox_output>{shown}{r.feedback}</sandbox_output>", end="", flush=True)
            print(f"\n[round {r.index + 1}: {r.status}, {len(r.images)} image(s), {r.seconds:.2f}s]", file=sys.stderr)
        elif event.kind == "rollback":
            r = event.round
            print(f"\n[round {r.index + 1} failed ({r.status}: {r.error}); retrying hotter]", file=sys.stderr)

    with tempfile.TemporaryDirectory(prefix="keye_chat_") as work, ToolLoop(engine, cfg) as loop:
        traj = loop.run([thyme_conversation(args.prompt, args.image)], mode=args.mode, out_dir=work, on_event=show)[0]
    print()
    print(
        f"[answer: {traj.answer!r}; {len(traj.rounds)} code round(s), {len(traj.discarded_rounds)} retried; "
        f"{traj.policy_tokens} generated tokens; finish: {traj.finish_reason}]",
        file=sys.stderr,
    )
    return 0
