import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
# Tests never reach the network: a missing dataset fails at once instead of trying to download.
os.environ["HIERCLS_NO_DOWNLOAD"] = "1"
