"""The `tuneloop` command: one module per subcommand, registered in `main.COMMANDS`.

    serve      cli/serve.py      the gRPC server
    generate   cli/generate.py   completions from a running server
    feedback   cli/feedback.py   send feedback; export what the trainer trains on
    adapters   cli/adapters.py   operate served versions (admin API); read the registry
    trainer    cli/trainer.py    one training round, or the sidecar
    reward     cli/reward.py     score replies with a published reward model

The command depends on the SDK (`tuneloop.client`), the server and the trainer; none of them
depends on it. Starting it imports neither torch nor vLLM: a command imports those only when it
runs and needs them.
"""
