"""Run-time backdoor implantation for image content protection: the study package (README.md)."""
