// Compile-only stub: signatures the adapters call, never shipped (see compile-only/README.md).
// Mirrors project/android/demo/app/src/main/java/com/taobao/android/mnn/MNNNetInstance.java of alibaba/MNN:
// Session is an inner class of MNNNetInstance and Tensor an inner class of Session, as there.
package com.taobao.android.mnn;

public class MNNNetInstance {
    public static MNNNetInstance createFromFile(String fileName) {
        throw new RuntimeException("compile-only stub");
    }

    public static class Config {
        public int numThread;
        public String[] saveTensors;

        public Config() {
            throw new RuntimeException("compile-only stub");
        }
    }

    public class Session {
        public class Tensor {
            private Tensor() {
                throw new RuntimeException("compile-only stub");
            }

            public void reshape(int[] dims) {
                throw new RuntimeException("compile-only stub");
            }

            public void setInputIntData(int[] data) {
                throw new RuntimeException("compile-only stub");
            }

            public void setInputFloatData(float[] data) {
                throw new RuntimeException("compile-only stub");
            }

            public int[] getDimensions() {
                throw new RuntimeException("compile-only stub");
            }

            public float[] getFloatData() {
                throw new RuntimeException("compile-only stub");
            }
        }

        private Session() {
            throw new RuntimeException("compile-only stub");
        }

        public void reshape() {
            throw new RuntimeException("compile-only stub");
        }

        public void run() {
            throw new RuntimeException("compile-only stub");
        }

        public Tensor getInput(String name) {
            throw new RuntimeException("compile-only stub");
        }

        public Tensor getOutput(String name) {
            throw new RuntimeException("compile-only stub");
        }
    }

    private MNNNetInstance() {
        throw new RuntimeException("compile-only stub");
    }

    public Session createSession(Config config) {
        throw new RuntimeException("compile-only stub");
    }

    public void release() {
        throw new RuntimeException("compile-only stub");
    }
}
