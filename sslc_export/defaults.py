"""Defaults shared by the command line and the dataclasses it fills, written once.

A plain module without torch, so that `sslc-export --help` can read it without the
seconds-long imports of the compression code. Why each value was chosen: docs/results.md.
"""

RATIO = 0.5  # fraction of each compressed layer's parameters removed
RANK_RATIO = 0.10  # sslc: share of the kept budget spent on U, V
SALIENT_FRACTION = 0.01  # sslc: top |W·D| entries always kept in S
REFIT_ROUNDS = 3  # sslc, exact loss: after the alternation, rounds of S re-solved on its mask and L refitted
TOL = 1e-4  # sslc: stop when one iteration improves the loss by less than this fraction
DAMP = 0.01  # exact loss: Gram damping, as a fraction of its mean diagonal
SEED = 0
BITS = 32  # 32 (fp32), 8 or 4
GROUP_SIZE = 32  # input columns per quantization scale
SCALES = "mse"  # quantization scales: mse (each group's best shrink of max |w| / qmax) | max
NSAMPLES = 64  # calibration sequences
SEQLEN = 256  # tokens per calibration sequence
WINDOW = 512  # tokens per perplexity window
SSLC_ITERS = {"exact": 16, "diag": 40}  # sslc: alternating iterations per loss when --iters is not given
SSLC_ITERS_TEXT = f"{SSLC_ITERS['exact']} with --loss exact, {SSLC_ITERS['diag']} with diag"
LOSPARSE_STEPS = {"exact": 64, "diag": 64}  # losparse: training steps (pruning schedule + final warm-up) when --iters is not given
# sslc settings by name; explicit flags win. paper: the published algorithm (the SSLC paper's Algorithm 1 and settings).
PRESETS = {"paper": {"loss": "diag", "first_step": "svd", "rank_ratio": 0.25, "iters": 40, "refit_rounds": 0}}
BENCH_PROMPT_LENGTHS = (32, 128, 512)  # prefill lengths timed by bench
BENCH_DECODE_TOKENS = 64  # new tokens per timed decode run
BENCH_REPEATS = 5  # timed repeats after warm-up
DEVICE = "cpu"
ALLOCATION = "uniform"  # how the budget is split over layers: uniform | global
MIN_KEEP = 0.2  # global allocation: bounds on each layer's kept fraction
MAX_KEEP = 0.9
FINETUNE_LOSS_FP32 = "lm"  # finetune of an fp32 checkpoint: lm (next-token cross-entropy); why: docs/results.md
FINETUNE_LOSS_GRID = "distill"  # finetune of a --bits checkpoint: distill (KL to the dense model's logits); why: same place
FINETUNE_STEPS = 64  # finetune: optimizer steps (SmolLM2 on 2 cores in <= 15 min: docs/results.md)
FINETUNE_LR = 3e-4  # finetune: Adam's learning rate for fp32 U, V (why: docs/results.md, "Recovery fine-tuning")
FINETUNE_GRID_LR = 0.05  # finetune on a grid (--bits checkpoints): U and V's learning rate in grid steps
FINETUNE_SCALE_LR = 2e-3  # finetune on a grid: the learning rate of their log scales (relative change per step)
FINETUNE_SEQLEN = 256  # finetune: tokens per training sequence
FINETUNE_BATCH = 4  # finetune: sequences per step
FINETUNE_SAVE_EVERY = 8  # finetune: steps between the points --resume continues from
