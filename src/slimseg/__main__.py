from slimseg.cli import main

main()
