"""Experiments that drive the libraries from outside them.

    demo.py            the embedded end-to-end demo (python -m experiments.demo; launch/demo.sh)
    ablate.py          the tokenizer ablation grid (python -m experiments.ablate; launch/ablate.sh), with
    ablate_grid.py     its grid model, the paper's claims and YAML grid files,
    ablate_stats.py    the claims' tests over seeds (Welch, 95 % CI, verdict), and
    ablate_report.py   its results tables and plot
    synthetic.py       the synthetic shapes world they train on (the library tests write shards with it too)
The libraries (unitok, mllm, runtime) never import from here.
"""
