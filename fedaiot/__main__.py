from fedaiot.cli import main

main()
