"""torch.library registrations, autograd Functions and input checks, one module per op."""
