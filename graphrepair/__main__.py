from graphrepair.cli import main

main(prog_name="graphrepair")
