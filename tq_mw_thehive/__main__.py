from tq_mw_thehive.cli import main

if __name__ == "__main__":
    main()
