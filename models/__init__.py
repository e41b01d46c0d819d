"""Pure nn.Modules and loaders for the harness's model families. Never imports click or `harness`."""
