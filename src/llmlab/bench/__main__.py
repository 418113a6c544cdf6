"""`python -m llmlab.bench decode ...`"""
import sys

from llmlab.bench import main

sys.exit(main())
