from ctmask.cli.main import main

main()
