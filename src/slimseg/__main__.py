from slimseg.cli.app import main

main()
