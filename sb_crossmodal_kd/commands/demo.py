"""Run the main job: make the embedded corpus, train and test the baseline, print WER."""

from sb_crossmodal_kd.demo import run_demo


def add_arguments(parser):
    """Registers the demo's options."""
    parser.add_argument("--output", default="sbkd_demo", help="output folder (default sbkd_demo)")
    parser.add_argument("--seed", type=int, default=1986, help="training seed")
    parser.add_argument("--epochs", type=int, default=None, help="override the recipe's epochs")
    parser.add_argument("--device", default="cpu", help="cpu or cuda:0")
    parser.add_argument(
        "--threads", type=int, default=1,
        help="torch CPU threads (default 1: OpenMP spin-waits make more threads far slower "
        "whenever another process is busy; raise it on a dedicated machine)",
    )


def run(args):
    """Runs the demo and prints its results table."""
    results = run_demo(
        args.output, seed=args.seed, epochs=args.epochs, device=args.device, threads=args.threads
    )
    print()
    print("| condition | WER % | CER % | train s | params |")
    print("|---|---|---|---|---|")
    print(
        f"| am_alone (seed {args.seed}) | {results['wer']:.2f} | {results['cer']:.2f} "
        f"| {results['train_s']:.0f} | {results['params']:,} |"
    )
