from tiedlm.cli import run

run()
