def main():
    print("infer")
