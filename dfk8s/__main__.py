from dfk8s.cli import main

main()
