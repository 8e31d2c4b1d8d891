"""DeepSpeed alone (no scaling code): a timm ViT under ZeRO-3 with ``stage3_module_granularity_threshold``, 2 steps.

Prints one JSON line: ``{"error": <the exception's text or null>, "losses": [...]}``. Launched with torchrun (one
rank over gloo) by ``tests/test_trainer.py``, which pins DeepSpeed 0.19.8's failure here (the reason scaling refuses
the key)."""

import json
import sys

import deepspeed
import timm
import torch

torch.manual_seed(0)
model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=5, img_size=32, patch_size=8,
                          embed_dim=64, depth=2, num_heads=2)
config = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "zero_allow_untested_optimizer": True,
          "optimizer": {"type": "SGD", "params": {"lr": 0.01}}, "steps_per_print": 10**9,
          "zero_optimization": {"stage": 3, "stage3_module_granularity_threshold": int(sys.argv[1])}}
engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
losses, error = [], None
try:
    for _ in range(2):
        loss = engine(torch.randn(2, 3, 32, 32)).square().mean()
        engine.backward(loss)
        engine.step()
        losses.append(float(loss))
except RuntimeError as e:
    error = str(e)
print(json.dumps({"error": error, "losses": losses}))
