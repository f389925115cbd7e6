"""A stand-in child process for supervisor tests: sleeps, prints a line, exits with a code."""

import sys
import time

if __name__ == "__main__":
    time.sleep(float(sys.argv[1]))
    print("child done", flush=True)
    sys.exit(int(sys.argv[2]))
