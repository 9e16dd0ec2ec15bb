"""`python -m moecxl.memory.tiers PROFILE.yaml ...`: print each profile's resolved record."""

import sys

import yaml

from moecxl.memory.tiers.hardware import Hardware

for arg in sys.argv[1:]:
    print(yaml.safe_dump(Hardware.from_yaml(arg).to_dict(), sort_keys=False, width=110))
