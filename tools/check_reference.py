#!/usr/bin/env python3
"""Check this implementation against fixtures made by the original DTL code.

    python tools/check_reference.py tests/fixtures/reference/vit_* [more folders]

One line per fixture with the measured differences (logits, side-off logits, loss, relative gradient error,
trainable count). Exit status 1 when any fixture fails (tolerances: docs/method.md, section 6) or cannot be run.
"""
import argparse
import os
import sys
import traceback

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from models.reference import GRAD_RTOL, LOGIT_TOL, check_fixture  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folders", nargs="+", help="fixture folders (meta.json, reference_state_dict.pt, io.pt)")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    failed = 0
    for folder in args.folders:
        name = os.path.basename(os.path.normpath(folder))
        missing = [f for f in ("meta.json", "reference_state_dict.pt", "io.pt") if not os.path.isfile(os.path.join(folder, f))]
        if missing:
            print(f"FAIL {name}: missing {', '.join(missing)} in {folder}")
            failed += 1
            continue
        try:
            res = check_fixture(folder)
        except (ImportError, ValueError, KeyError, RuntimeError) as e:
            kind = "unsupported" if isinstance(e, ImportError) else "error"
            print(f"FAIL {name}: {kind}: {type(e).__name__}: {e}")
            if os.environ.get("DTL_DEBUG"):
                traceback.print_exc()
            failed += 1
            continue
        print(res.line())
        failed += not res.ok
    print(f"{len(args.folders) - failed} passed, {failed} failed (tolerances: logits/loss {LOGIT_TOL:g} abs, "
          f"gradients {GRAD_RTOL:g} rel)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
