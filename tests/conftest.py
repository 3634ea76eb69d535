import os
import warnings

os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")
os.environ["HF_HUB_OFFLINE"] = "1"  # parity tests must never reach a hub
warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex are not installed.*")
