"""The lab: the tutorials' BN-vs-no-BN experiments and sweeps that test BN's claims.

    cli.py          the `batchnorm` command: demo, run, list, download
    config.py       RunConfig, the dataclass every run is described by
    data.py         circles, digits, MNIST/Fashion-MNIST (IDX reader, checksum-verified download)
    models.py       the tutorials' networks and the table of normalization variants
    train.py        the one training loop every experiment uses (checkpoint per epoch, resume)
    experiments/    what each experiment trains, and the verdicts its report states
    runner.py       runs an experiment's cells into an output folder: resume, CSV, summary.json
    plots.py        every figure (matplotlib, Agg backend)
    report.py       the self-contained report.html
    io.py           atomic writes

Nothing here is imported by `import batchnorm`; matplotlib, scikit-learn and tqdm are imported
only inside the lab, where they are used.
"""
