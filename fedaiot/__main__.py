from fedaiot.cli.main import main

main()
