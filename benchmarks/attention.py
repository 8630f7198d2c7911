"""Placeholder until the attention benchmark lands: checks the install and says what it cannot measure."""
import torch

import vit_fast

print(f"vit_fast {vit_fast.__version__}: {'GPU ' + torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU found'}")
print("attention benchmark: not written yet")
