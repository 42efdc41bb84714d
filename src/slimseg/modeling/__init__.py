"""Pure ``nn.Module`` definitions: no files, devices or command-line concerns here."""
