import sys

from peft_tensor.cli import main

sys.exit(main())
