"""nmcompile: N:M structured-sparse training as a torch.compile backend."""
